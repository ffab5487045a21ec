#!/bin/sh
# Build steps shared by every image stage in images/Dockerfile (one script, so the four pairs cannot drift apart).
#
#   install.sh build-system     Python, venv support and (only when no prebuilt llama-cpp-python wheel is given)
#                               a compiler, in a build stage
#   install.sh runtime-system   Python and the OpenMP runtime llama.cpp links against, in a shipping stage
#   install.sh deps             the venv at $CECAI_HOME/venv with llama-cpp-python (the prebuilt wheel from /wheels,
#                               else built from the sdist with $CMAKE_ARGS), torch and the project's dependencies
#                               (read from /src/pyproject.toml), plus the pinned llama-cpp-python sdist
#   install.sh project          the project from /src and the converter files of the pinned llama.cpp
#
# Inputs: /wheels (the `wheels` build context; may be empty), /cross (the wheel the `cross` stage compiled, if any),
# /etc/ssl/certs/extra-ca.crt (the optional `ca` build secret), env LLAMA_CPP_PYTHON_VERSION, TORCH_VERSION,
# TORCH_INDEX_URL, CMAKE_ARGS, CECAI_HOME, CECAI_TOOLCHAIN_DIR.
set -eu

CECAI_HOME="${CECAI_HOME:-/opt/cecai}"
VENV="$CECAI_HOME/venv"
WHEELS=/wheels
CROSS=/cross
SDIST="llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION:-unset}.tar.gz"
SDIST_DIR=/var/cache/cecai-sdist
EXTRA_CA=/etc/ssl/certs/extra-ca.crt

if [ -f "$EXTRA_CA" ]; then
    # A corporate proxy's CA: pip trusts the system bundle plus this one (the secret is never written to a layer).
    bundle=/tmp/cecai-ca-bundle.crt
    cat /etc/ssl/certs/ca-certificates.crt "$EXTRA_CA" >"$bundle" 2>/dev/null || cp "$EXTRA_CA" "$bundle"
    export PIP_CERT="$bundle" SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle"
fi
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive

prebuilt_wheel() {
    # A llama-cpp-python wheel for this machine in the wheels context, else one the cross stage compiled, if any.
    for f in "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*"$(uname -m)".whl \
        "$CROSS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*"$(uname -m)".whl; do
        [ -f "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

project_requirements() {
    # The project's dependencies and its `local` extra, read from /src/pyproject.toml, with torch at TORCH_VERSION
    # (equal to the pyproject pin by default, a test keeps them so; a build may override it, e.g. where only an
    # older CPU build exists for the target). tomllib is Python 3.11+; pip vendors tomli for older Pythons.
    "$VENV/bin/python" - <<'EOF'
import os
import re

try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib

with open("/src/pyproject.toml", "rb") as fh:
    project = tomllib.load(fh)["project"]
for req in [*project["dependencies"], *project["optional-dependencies"]["local"]]:
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower()
    print(f"torch=={os.environ['TORCH_VERSION']}" if name == "torch" else req)
EOF
}

apt_install() {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    rm -rf /var/lib/apt/lists/*
}

python_packages() {
    # Distribution Python (Ubuntu/Debian bases) needs python3 (+ venv to create one); python:*-slim has both.
    if command -v python3 >/dev/null 2>&1 && python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        return 0
    fi
    echo python3 python3-venv
}

case "${1:?usage: install.sh build-system|runtime-system|deps|project}" in
build-system)
    packages="$(python_packages) ca-certificates libgomp1"
    if ! prebuilt_wheel >/dev/null; then
        packages="$packages build-essential cmake git"
    fi
    # shellcheck disable=SC2086
    apt_install $packages
    ;;
runtime-system)
    packages="ca-certificates libgomp1"
    if ! command -v python3 >/dev/null 2>&1; then
        packages="$packages python3"
    fi
    # shellcheck disable=SC2086
    apt_install $packages
    ;;
deps)
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade "pip>=24"
    # The pinned sdist: the converter files come from it (`project`), and llama-cpp-python builds from it.
    mkdir -p "$SDIST_DIR"
    if [ -f "$WHEELS/$SDIST" ]; then
        cp "$WHEELS/$SDIST" "$SDIST_DIR/"
    else
        "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: -d "$SDIST_DIR" \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    fi
    if wheel="$(prebuilt_wheel)"; then
        echo "llama-cpp-python: prebuilt wheel $(basename "$wheel")"
        "$VENV/bin/pip" install --quiet "$wheel"
    else
        echo "llama-cpp-python: building $LLAMA_CPP_PYTHON_VERSION from source with CMAKE_ARGS='${CMAKE_ARGS:-}'"
        CMAKE_ARGS="${CMAKE_ARGS:-}" "$VENV/bin/pip" install --quiet "$SDIST_DIR/$SDIST"
    fi
    # The converter only reads tensors: a CPU torch serves every pair (the CUDA build adds gigabytes for nothing).
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet --find-links "$WHEELS" \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
    # The project's other dependencies, from pyproject.toml alone (the source is not copied yet); `project`
    # installs the project itself with --no-deps.
    project_requirements >/tmp/cecai-requirements.txt
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet --find-links "$WHEELS" \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/cecai-requirements.txt
    rm -f /tmp/cecai-requirements.txt
    "$VENV/bin/python" -c "import llama_cpp, torch; print('llama-cpp-python', llama_cpp.__version__, 'torch', torch.__version__)"
    ;;
project)
    "$VENV/bin/pip" install --quiet --no-deps /src
    # Fetch (verify the pinned checksum, extract) the converter of the same llama.cpp into $CECAI_TOOLCHAIN_DIR.
    "$VENV/bin/cecai-convert" toolchain --fetch --sdist "$SDIST_DIR/$SDIST"
    # The image ships the ~2 MB of converter files, not the 77 MB sdist they came from.
    find "$CECAI_TOOLCHAIN_DIR" -name 'llama_cpp_python-*.tar.gz' -delete
    # Containers run as the caller's uid: everything must be readable by anyone, writable by no one.
    chmod -R a+rX,go-w "$CECAI_HOME"
    ;;
*)
    echo "install.sh: unknown step $1" >&2
    exit 2
    ;;
esac
