#!/usr/bin/env bash
# Build the CPU image (target `cpu` of images/Dockerfile) on a local engine, without a registry and without
# compiling llama.cpp inside the image. Used by CI (.ci/run), the engine tests and `nox -s build-images` when
# buildx is not available. Repeated runs are cheap: the base image is made once and the engine's layer cache
# keeps every layer whose inputs did not change.
#
# usage: scripts/build-cpu-image.sh [TAG]     (prints the tag on the last line of stdout)
#
# Env (all optional):
#   CECAI_IMAGE_REPO       repository of the default tag        (default localhost/cecai-converter)
#   CECAI_CPU_BASE_IMAGE   base image                           (default localhost/debian-python:bookworm, made
#                          with debootstrap + import when missing; set python:3.11-slim-bookworm where a registry
#                          can be reached)
#   CECAI_IMAGE_WHEELS     the wheels build context it assembles (default ~/.cache/cecai-converter/image-wheels):
#                          torch from pip's find-links, the llama-cpp-python wheel and sdist
#   CECAI_WHEEL_CACHE      where the llama-cpp-python wheel is kept (default ~/.cache/cecai-converter/wheels, the
#                          folder ./dev uses); built there with `pip wheel` when missing (~6 min on 2 cores, then
#                          pip's wheel cache); CECAI_LLAMA_WHEEL_DIR names a folder holding a prebuilt one
#   CECAI_CA_FILE          CA bundle passed as the `ca` build secret (default: the system bundle, if present)
#   CECAI_IMAGE_ENGINE     podman or docker (default: podman when installed, else docker buildx)
#   PYTHON                 the Python whose pip assembles the wheels (default python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -n1)"
llama_version="$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION: Final = "\(.*\)"/\1/p' "$root/src/cecai_converter/toolchain.py")"
torch_version="$(sed -n 's/^ARG TORCH_VERSION=\(.*\)/\1/p' "$root/images/Dockerfile" | head -n1)"
tag="${1:-${CECAI_IMAGE_REPO:-localhost/cecai-converter}:${version}-cpu}"
base="${CECAI_CPU_BASE_IMAGE:-localhost/debian-python:bookworm}"
wheels="${CECAI_IMAGE_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/cecai-converter/image-wheels}"
ca="${CECAI_CA_FILE:-/etc/ssl/certs/ca-certificates.crt}"

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

# 1. The base image. Without a registry, make a Debian bookworm image with Python 3.11 (the torch wheel's Python).
if ! $engine image inspect "$base" >/dev/null 2>&1; then
    if [ "$base" != localhost/debian-python:bookworm ]; then
        echo "==> pulling $base" >&2
        $engine pull "$base" >&2 || { echo "error: could not pull $base" >&2; exit 1; }
    else
        echo "==> making $base with debootstrap (once)" >&2
        rootfs="$(mktemp -d /tmp/cecai-rootfs.XXXXXX)"
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
            >/tmp/cecai-debootstrap.log 2>&1 ||
            { echo "error: debootstrap failed; see /tmp/cecai-debootstrap.log" >&2; exit 1; }
        tar -C "$rootfs" -c . | $engine import - "$base" >/dev/null
        rm -rf "$rootfs"
        trap - EXIT
    fi
fi

# 2. The wheels context: nothing in it is compiled inside the image.
mkdir -p "$wheels"
torch_index_arg=()
torch_found=""
while IFS= read -r dir; do
    for f in "$dir"/torch-"$torch_version"*-cp311-*x86_64.whl; do
        [ -f "$f" ] || continue
        [ -f "$wheels/${f##*/}" ] || cp "$f" "$wheels/"
        torch_found=1
    done
done < <("$python" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u)
if [ -n "$torch_found" ]; then
    torch_index_arg=(--build-arg TORCH_INDEX_URL=)  # the local CPU wheel; the PyTorch index may be unreachable
fi
wheel_cache="${CECAI_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cecai-converter/wheels}"
if ! compgen -G "$wheel_cache/llama_cpp_python-$llama_version-*.whl" >/dev/null; then
    echo "==> building the llama-cpp-python $llama_version wheel into $wheel_cache (once; ~6 min on 2 cores)" >&2
    extra=()
    if [ -n "${CECAI_LLAMA_WHEEL_DIR:-}" ]; then extra=(--find-links "$CECAI_LLAMA_WHEEL_DIR"); fi
    mkdir -p "$wheel_cache"
    # Portable CPU flags (the image must run on other x86-64 hosts); ./dev builds the same wheel the same way.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$python" -m pip wheel --quiet --no-deps "${extra[@]}" \
        -w "$wheel_cache" "llama-cpp-python==$llama_version" >&2
fi
for f in "$wheel_cache"/llama_cpp_python-"$llama_version"-*.whl; do
    cmp -s "$f" "$wheels/${f##*/}" || cp "$f" "$wheels/"
done
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
cp "$root/images/Dockerfile" "$root/images/install.sh" "$context/images/"
if [ -f "$root/README.md" ]; then cp "$root/README.md" "$context/"; else echo "# cecai-converter" >"$context/README.md"; fi
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -c src | tar -C "$context" -x

secret=()
if [ -f "$ca" ]; then secret=(--secret "id=ca,src=$ca"); fi
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
build=(build)
if [ "$engine" = docker ]; then build=(buildx build --load); else build+=(--network host --layers); fi

old_id="$($engine image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
echo "==> building $tag (base $base) with $engine" >&2
$engine "${build[@]}" \
    "${secret[@]}" \
    --build-context "wheels=$wheels" \
    --build-arg "CPU_BASE_IMAGE=$base" \
    "${torch_index_arg[@]}" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    --target cpu \
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
