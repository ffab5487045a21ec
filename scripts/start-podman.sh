#!/usr/bin/env bash
# Start a real container engine with a Docker-compatible API: podman's API service on a unix socket.
#
# Used by CI (.ci/run) and by developers on machines without a Docker daemon. Idempotent: installs podman, runc
# and debootstrap only when missing, writes containers.conf only when absent, and returns at once when the socket
# already answers. Afterwards:   export DOCKER_HOST=unix:///tmp/podman.sock
#
# Env: CECAI_PODMAN_SOCKET (default /tmp/podman.sock), CECAI_PODMAN_LOG (default /tmp/podman.log).
# Left behind (`./dev clean` undoes the last two): the packages it installed, /etc/containers/containers.conf (when
# it wrote it), and the service, running, with its pid in <socket>.pid.
set -euo pipefail

socket="${CECAI_PODMAN_SOCKET:-/tmp/podman.sock}"
log="${CECAI_PODMAN_LOG:-/tmp/podman.log}"

answers() {
    curl -fsS --max-time 5 --unix-socket "$socket" http://d/_ping >/dev/null 2>&1
}

# A service left by an earlier run whose working directory was deleted since (a removed CI clone) still answers
# pings, but every container start fails ("conmon: Failed to get working directory"): replace it.
stale_service() {
    local pid
    for pid in $(pgrep -f "podman system service.*unix://$socket" || true); do
        case "$(readlink "/proc/$pid/cwd" 2>/dev/null)" in *" (deleted)") return 0 ;; esac
    done
    return 1
}

if answers; then
    if ! stale_service; then
        echo "podman API already answers on unix://$socket"
        exit 0
    fi
    echo "replacing the podman service on unix://$socket: its working directory was deleted"
    pkill -f "podman system service.*unix://$socket" || true
    for _ in $(seq 1 20); do answers || break; sleep 0.5; done
fi

missing=()
for tool in podman runc debootstrap curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "error: missing ${missing[*]}; install them (apt-get install podman runc debootstrap curl) as root" >&2
        exit 1
    fi
    echo "installing ${missing[*]} …"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends podman runc debootstrap curl ca-certificates >/dev/null
fi

conf=/etc/containers/containers.conf
if [ "$(id -u)" = 0 ] && [ ! -f "$conf" ]; then
    mkdir -p /etc/containers
    cat >"$conf" <<'CONF'
# written by cecai-converter's scripts/start-podman.sh (this line marks it: `./dev clean` removes the file)
[containers]
# the sandbox forbids raising rlimits; podman's defaults would try to
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
[engine]
# crun fails here (cgroups in hybrid mode); runc works
runtime = "runc"
CONF
fi

rm -f "$socket"
# Started from / so that its (and every conmon's) working directory outlives the folder this script ran in.
cd /
setsid podman system service --time=0 "unix://$socket" </dev/null >"$log" 2>&1 &
# The service's pid, for `./dev clean` (scripts/dev-clean.sh), which stops only a service this script started.
echo "$!" >"$socket.pid"
for _ in $(seq 1 60); do
    if answers; then
        echo "podman API answers on unix://$socket"
        echo "export DOCKER_HOST=unix://$socket"
        exit 0
    fi
    sleep 0.5
done
echo "error: podman API did not answer on unix://$socket within 30s; see $log" >&2
tail -n 20 "$log" >&2 || true
exit 1
