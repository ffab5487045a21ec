#!/usr/bin/env bash
# `./dev clean [--caches] [--venv]`: remove what `./dev test` and `./dev demo` left on this machine.
#
#   always      the podman API service scripts/start-podman.sh started (by its pid file, never by name), its socket;
#               /etc/containers/containers.conf when start-podman.sh wrote it (its first line says so);
#               the project's containers (label io.cecai.converter) and images (label io.cecai.pair, the debootstrap
#               bases localhost/debian-python*:bookworm) and the dangling images their builds left (podman image
#               prune: any other dangling image goes too)
#   --caches    ~/.cache/cecai-converter (the llama-cpp-python wheel, the pinned sdist and converter, llama.cpp's
#               tools, fidelity's cache: a later ./dev rebuilds them, minutes of compiling), and $CECAI_WHEEL_CACHE /
#               $CECAI_TOOLCHAIN_DIR when set elsewhere
#   --venv      the .venv (or $CECAI_VENV) ./dev installed into
#
# Kept: the packages start-podman.sh installed with apt (podman, runc, debootstrap, curl): `apt-get remove` them.
# Env: CECAI_PODMAN_SOCKET (default /tmp/podman.sock), as for start-podman.sh; CECAI_CONTAINERS_CONF (the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

caches=0
venv=0
for arg in "$@"; do
    case "$arg" in
        --caches) caches=1 ;;
        --venv) venv=1 ;;
        *) echo "usage: ./dev clean [--caches] [--venv]" >&2; exit 2 ;;
    esac
done

socket="${CECAI_PODMAN_SOCKET:-/tmp/podman.sock}"
conf="${CECAI_CONTAINERS_CONF:-/etc/containers/containers.conf}"
marker="# written by cecai-converter's scripts/start-podman.sh"

engine() {
    # The engine's own CLI: podman (what start-podman.sh installs), else docker.
    if command -v podman >/dev/null 2>&1; then podman "$@"; elif command -v docker >/dev/null 2>&1; then docker "$@"; else return 127; fi
}

if command -v podman >/dev/null 2>&1 || command -v docker >/dev/null 2>&1; then
    containers="$(engine ps -aq --filter label=io.cecai.converter 2>/dev/null || true)"
    if [ -n "$containers" ]; then
        echo "==> removing the project's containers"
        # shellcheck disable=SC2086 # one id per word
        engine rm -f $containers >/dev/null
    fi
    images="$(engine images -q --filter label=io.cecai.pair 2>/dev/null | sort -u | tr "\n" " " || true)"
    for base in localhost/debian-python:bookworm localhost/debian-python-arm64:bookworm; do
        if engine image inspect "$base" >/dev/null 2>&1; then images="$images $base"; fi
    done
    if [ -n "${images// /}" ]; then
        echo "==> removing the project's images:${images}"
        # shellcheck disable=SC2086 # one id or name per word
        engine rmi -f $images >/dev/null || true
    fi
    echo "==> removing dangling images (the builds' intermediate stages)"
    engine image prune -f >/dev/null || true
else
    echo "==> no podman or docker here: no containers or images to remove"
fi

pidfile="$socket.pid"
if [ -f "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    # Only the service start-podman.sh started: the pid must still be a podman API service on this socket.
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "podman system service.*unix://$socket"; then
        echo "==> stopping the podman API service on unix://$socket (pid $pid)"
        kill "$pid"
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$pidfile" "$socket"
elif [ -S "$socket" ]; then
    echo "==> a podman socket is at $socket, but start-podman.sh has no pid file for it: left running"
fi

if [ -f "$conf" ] && head -n 1 "$conf" | grep -qF "$marker"; then
    echo "==> removing $conf (written by start-podman.sh)"
    rm -f "$conf"
fi

if [ "$caches" = 1 ]; then
    for dir in "$HOME/.cache/cecai-converter" "${CECAI_WHEEL_CACHE:-}" "${CECAI_TOOLCHAIN_DIR:-}"; do
        if [ -n "$dir" ] && [ -e "$dir" ]; then
            echo "==> removing $dir ($(du -sh "$dir" 2>/dev/null | cut -f1))"
            rm -rf "$dir"
        fi
    done
fi
if [ "$venv" = 1 ] && [ -e "${CECAI_VENV:-.venv}" ]; then
    echo "==> removing ${CECAI_VENV:-.venv}"
    rm -rf "${CECAI_VENV:-.venv}"
fi
if [ "$caches" = 0 ]; then
    echo "kept: ~/.cache/cecai-converter (the built wheel and tools; ./dev clean --caches removes it)"
fi
echo "kept: the packages start-podman.sh installed with apt, if any (podman, runc, debootstrap, curl)"
