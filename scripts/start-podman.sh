#!/usr/bin/env bash
# Start a real container engine with a Docker-compatible API: podman's API service on a unix socket.
#
# Used by CI (.ci/run) and by developers on machines without a Docker daemon. Idempotent: installs podman, runc
# and debootstrap only when missing, writes containers.conf only when absent, and returns at once when the socket
# already answers. Afterwards:   export DOCKER_HOST=unix:///tmp/podman.sock
#
# Env: CECAI_PODMAN_SOCKET (default /tmp/podman.sock), CECAI_PODMAN_LOG (default /tmp/podman.log).
set -euo pipefail

socket="${CECAI_PODMAN_SOCKET:-/tmp/podman.sock}"
log="${CECAI_PODMAN_LOG:-/tmp/podman.log}"

answers() {
    curl -fsS --max-time 5 --unix-socket "$socket" http://d/_ping >/dev/null 2>&1
}

if answers; then
    echo "podman API already answers on unix://$socket"
    exit 0
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
[containers]
# the sandbox forbids raising rlimits; podman's defaults would try to
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
[engine]
# crun fails here (cgroups in hybrid mode); runc works
runtime = "runc"
CONF
fi

rm -f "$socket"
setsid podman system service --time=0 "unix://$socket" </dev/null >"$log" 2>&1 &
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
