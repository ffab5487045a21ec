#!/usr/bin/env bash
# Build one pair's image from images/Dockerfile on a local engine (podman, or docker buildx), without a registry
# for the CPU pairs and without compiling llama.cpp under emulation. The pair's facts (bases, llama.cpp flags,
# platform) come from src/cecai_converter/pairs.py (`python -m cecai_converter.images build-args PAIR`). Used by
# the engine tests (through scripts/build-cpu-image.sh), `nox -s build-images` without buildx and `nox -s
# check-arm`. Repeated runs are cheap: bases are made once and the engine's layer cache keeps every layer whose
# inputs did not change.
#
# usage: scripts/build-image.sh PAIR [TAG]     (PAIR: a name or slug; prints the tag on the last line of stdout)
#
# An image for another architecture (ARM_LLM_LLAMA on x86-64) needs QEMU user-mode emulation registered with
# binfmt_misc (Debian: qemu-user-static binfmt-support); llama-cpp-python is then cross-compiled at native speed
# in the Dockerfile's `cross` stage, and only pip runs emulated.
#
# Env (all optional):
#   CECAI_IMAGE_REPO       repository of the default tag        (default localhost/cecai-converter)
#   CECAI_BASE_IMAGE       build and ship base image            (default the pair's bases from pairs.py; for CPU
#                          pairs localhost/debian-python[-ARCH]:bookworm, made with debootstrap when missing;
#                          CECAI_CPU_BASE_IMAGE is read for CPU_LLM_LLAMA too)
#   CECAI_IMAGE_WHEELS     the wheels build context it assembles (default
#                          ~/.cache/cecai-converter/image-wheels/ARCH): torch for the target, the llama-cpp-python
#                          wheel (x86-64: from CECAI_WHEEL_CACHE) and sdist
#   CECAI_WHEEL_CACHE      where the x86-64 llama-cpp-python wheel is kept (default ~/.cache/cecai-converter/wheels,
#                          the folder ./dev uses); built there with `pip wheel` when missing; CECAI_LLAMA_WHEEL_DIR
#                          names a folder holding a prebuilt one
#   CECAI_TORCH_VERSION    torch to install (default pyproject's pin). PyPI's torch 2.13.0 for aarch64 is a CUDA
#                          build whose CUDA 13 dependencies not every package mirror carries; where the PyTorch CPU
#                          index cannot be reached either, an older CPU-only aarch64 build (2.8.0) can stand in.
#   CECAI_CA_FILE          CA bundle passed as the `ca` build secret (default: the system bundle, if present)
#   CECAI_IMAGE_ENGINE     podman or docker (default: podman when installed, else docker buildx)
#   PYTHON                 the Python that reads pairs.py and whose pip assembles the wheels (default python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ $# -lt 1 ]; then
    echo "usage: scripts/build-image.sh PAIR [TAG]   (PAIR: CPU_LLM_LLAMA, ARM_LLM_LLAMA, ... or cpu, arm, ...)" >&2
    exit 2
fi
images() { PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" "$python" -m cecai_converter.images "$@"; }
read -r slug platform < <(images platform "$1") || exit 2
arch="${platform#*/}"
declare -A args=()
while IFS='=' read -r key value; do args[$key]="$value"; done < <(images build-args "$1")
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -n1)"
llama_version="$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION: Final = "\(.*\)"/\1/p' "$root/src/cecai_converter/toolchain.py")"
torch_version="${CECAI_TORCH_VERSION:-$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' "$root/pyproject.toml" | head -n1)}"
tag="${2:-${CECAI_IMAGE_REPO:-localhost/cecai-converter}:${version}-${slug}}"
wheels="${CECAI_IMAGE_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/cecai-converter/image-wheels/$arch}"
ca="${CECAI_CA_FILE:-/etc/ssl/certs/ca-certificates.crt}"
host_arch="$(uname -m)"
case "$host_arch" in x86_64) host_arch=amd64 ;; aarch64) host_arch=arm64 ;; esac
case "$arch" in amd64) machine=x86_64 ;; arm64) machine=aarch64 ;; *) machine="$arch" ;; esac

if [ -n "${CECAI_IMAGE_ENGINE:-}" ]; then
    engine="$CECAI_IMAGE_ENGINE" # podman or docker: where the tests' DOCKER_HOST points
elif command -v podman >/dev/null 2>&1; then
    engine=podman
elif docker buildx version >/dev/null 2>&1; then
    engine=docker
else
    echo "error: neither podman nor docker buildx is available" >&2
    echo "hint: run scripts/start-podman.sh (installs podman), or install the docker buildx plugin" >&2
    exit 1
fi

# A Debian bookworm image with Python 3.11 (the torch wheels' Python) for ARCH, made without a registry.
local_base() { [ "$1" = "$host_arch" ] && echo localhost/debian-python:bookworm || echo "localhost/debian-python-$1:bookworm"; }
ensure_base() { # IMAGE ARCH
    local image="$1" base_arch="$2" rootfs
    $engine image inspect "$image" >/dev/null 2>&1 && return 0
    if [[ "$image" != localhost/debian-python* ]]; then
        echo "==> pulling $image" >&2
        $engine pull --platform "linux/$base_arch" "$image" >&2 || { echo "error: could not pull $image" >&2; exit 1; }
        return 0
    fi
    echo "==> making $image with debootstrap (once; a few minutes, longer for another architecture)" >&2
    rootfs="$(mktemp -d /tmp/cecai-rootfs.XXXXXX)"
    debootstrap --arch="$base_arch" --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
        >/tmp/cecai-debootstrap.log 2>&1 ||
        { rm -rf "$rootfs"; echo "error: debootstrap failed; see /tmp/cecai-debootstrap.log" >&2; exit 1; }
    tar -C "$rootfs" -c . | $engine import --arch "$base_arch" - "$image" >/dev/null
    rm -rf "$rootfs"
}

if [ "$arch" != "$host_arch" ] && ! [ -e "/proc/sys/fs/binfmt_misc/qemu-$machine" ]; then
    echo "error: building a linux/$arch image on $host_arch needs QEMU registered for $machine binaries" >&2
    echo "hint: apt-get install qemu-user-static binfmt-support; mount -t binfmt_misc binfmt_misc" \
        "/proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-$machine" >&2
    exit 1
fi

# 1. Bases. CPU pairs get a local Debian base unless one is named; the others use their pairs.py bases (pulled).
base="${CECAI_BASE_IMAGE:-}"
if [ -z "$base" ] && [ "$slug" = cpu ]; then base="${CECAI_CPU_BASE_IMAGE:-}"; fi
if [ -z "$base" ] && [ "${args[CROSS_COMPILE]}" = 1 ]; then base="$(local_base "$arch")"; fi
if [ -n "$base" ]; then args[BUILD_BASE_IMAGE]="$base" args[SHIP_BASE_IMAGE]="$base"; fi
ensure_base "${args[BUILD_BASE_IMAGE]}" "$arch"
ensure_base "${args[SHIP_BASE_IMAGE]}" "$arch"
# The cross stage runs on this machine's platform, on a Debian bookworm like the CPU bases (the same glibc): the
# local one next to local bases, else the Dockerfile's default.
if [[ "${args[BUILD_BASE_IMAGE]}" == localhost/debian-python* ]]; then
    cross_base="$(local_base "$host_arch")"
else
    cross_base="${CECAI_CROSS_BASE_IMAGE:-python:3.11-slim-bookworm}"
fi
ensure_base "$cross_base" "$host_arch"

# 2. The wheels context: torch for the target and the sdist; for the build machine's own architecture also the
#    llama-cpp-python wheel ./dev builds (another architecture's is cross-compiled in the image's `cross` stage).
mkdir -p "$wheels"
torch_args=(--build-arg "TORCH_VERSION=$torch_version")
if ! compgen -G "$wheels/torch-$torch_version*-cp311-*$machine.whl" >/dev/null; then
    while IFS= read -r dir; do
        for f in "$dir"/torch-"$torch_version"*-cp311-*"$machine".whl; do
            [ -f "$f" ] && cp "$f" "$wheels/"
        done
    done < <("$python" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u)
fi
if [ "$arch" != "$host_arch" ] && ! compgen -G "$wheels/torch-$torch_version*-cp311-*$machine.whl" >/dev/null; then
    echo "==> downloading torch $torch_version for $machine" >&2
    "$python" -m pip download --quiet --no-deps --only-binary :all: --python-version 3.11 \
        --platform "manylinux_2_28_$machine" -d "$wheels" "torch==$torch_version" >&2
fi
if compgen -G "$wheels/torch-$torch_version*-cp311-*$machine.whl" >/dev/null; then
    torch_args+=(--build-arg TORCH_INDEX_URL=) # the local wheel; the PyTorch index may be unreachable
fi
if [ "$arch" = "$host_arch" ] && [ "${args[CROSS_COMPILE]}" = 1 ]; then
    wheel_cache="${CECAI_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cecai-converter/wheels}"
    if ! compgen -G "$wheel_cache/llama_cpp_python-$llama_version-*$machine.whl" >/dev/null; then
        echo "==> building the llama-cpp-python $llama_version wheel into $wheel_cache (once; 6 min on 2 quiet cores, more when busy)" >&2
        extra=()
        if [ -n "${CECAI_LLAMA_WHEEL_DIR:-}" ]; then extra=(--find-links "$CECAI_LLAMA_WHEEL_DIR"); fi
        mkdir -p "$wheel_cache"
        # The pair's own portable flags; ./dev builds the x86-64 wheel with the same ones.
        CMAKE_ARGS="${args[CMAKE_ARGS]}" "$python" -m pip wheel --quiet --no-deps "${extra[@]}" \
            -w "$wheel_cache" "llama-cpp-python==$llama_version" >&2
    fi
    for f in "$wheel_cache"/llama_cpp_python-"$llama_version"-*"$machine".whl; do
        cmp -s "$f" "$wheels/${f##*/}" || cp "$f" "$wheels/"
    done
fi
sdist="llama_cpp_python-$llama_version.tar.gz"
if [ ! -f "$wheels/$sdist" ]; then
    cached="${CECAI_TOOLCHAIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cecai-converter/toolchain}/llama-cpp-python-$llama_version/$sdist"
    if [ -f "$cached" ]; then
        cp "$cached" "$wheels/"
    else
        "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$wheels" "llama-cpp-python==$llama_version" >&2
    fi
fi

# 3. A small build context: only what the Dockerfile copies.
context="$(mktemp -d /tmp/cecai-context.XXXXXX)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/images"
cp "$root/pyproject.toml" "$context/"
cp "$root/images/Dockerfile" "$root/images/install.sh" "$root/images/cross-wheel.sh" "$context/images/"
if [ -f "$root/README.md" ]; then cp "$root/README.md" "$context/"; else echo "# cecai-converter" >"$context/README.md"; fi
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -c src | tar -C "$context" -x

build_args=()
for key in "${!args[@]}"; do build_args+=(--build-arg "$key=${args[$key]}"); done
secret=()
if [ -f "$ca" ]; then secret=(--secret "id=ca,src=$ca"); fi
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
build=(build)
if [ "$engine" = docker ]; then
    build=(buildx build --load)
else
    # BuildKit sets BUILDPLATFORM and BUILDARCH itself; podman 4 leaves them empty (the cross stage would then run
    # on the target's platform).
    build+=(--network host --layers --build-arg "BUILDPLATFORM=linux/$host_arch" --build-arg "BUILDARCH=$host_arch")
fi

old_id="$($engine image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
echo "==> building $tag ($platform, base ${args[BUILD_BASE_IMAGE]}) with $engine" >&2
$engine "${build[@]}" \
    --platform "$platform" \
    "${secret[@]}" \
    --build-context "wheels=$wheels" \
    "${build_args[@]}" \
    --build-arg "CROSS_BASE_IMAGE=$cross_base" \
    "${torch_args[@]}" \
    --build-arg "LLAMA_CPP_PYTHON_VERSION=$llama_version" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    -f "$context/images/Dockerfile" \
    -t "$tag" \
    "$context" >&2
# The image this build replaced holds a 1.5 GB copy of the venv: drop it (the layer cache stays; an image still
# tagged elsewhere or used by a container is kept).
new_id="$($engine image inspect --format '{{.Id}}' "$tag")"
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    $engine image rm "$old_id" >/dev/null 2>&1 || true
fi
echo "$tag"
