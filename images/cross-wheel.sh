#!/bin/sh
# Cross-compile the llama-cpp-python wheel for the image's architecture on the build machine's own (the `cross` stage
# of images/Dockerfile, which runs on $BUILDPLATFORM). Compiling llama.cpp under QEMU takes hours and has crashed
# upstream; a cross compiler runs at native speed. llama-cpp-python is ctypes plus shared libraries (its wheel is
# tagged py3-none-<platform>), so a wheel built this way and retagged for the target installs and runs there.
#
# Writes the wheel to /cross, or leaves /cross empty (the build stage then installs a prebuilt wheel or compiles on
# the target platform) when: the target is the build machine's architecture, the pair may not be cross-compiled
# (CUDA builds need the pair's SDK), or the `wheels` build context already holds a wheel for the target.
#
# Inputs: env TARGETARCH, BUILDARCH (Docker's names: amd64, arm64), CROSS_COMPILE (1 or 0), CMAKE_ARGS,
# LLAMA_CPP_PYTHON_VERSION; /wheels (the `wheels` build context; the sdist is taken from it when present);
# /etc/ssl/certs/extra-ca.crt (the optional `ca` secret).
set -eu

OUT=/cross
WHEELS=/wheels
EXTRA_CA=/etc/ssl/certs/extra-ca.crt
mkdir -p "$OUT"

if [ "${TARGETARCH:?}" = "${BUILDARCH:?}" ]; then
    echo "cross-wheel: building for the build machine's own architecture ($TARGETARCH): nothing to cross-compile"
    exit 0
fi
if [ "${CROSS_COMPILE:-0}" != 1 ]; then
    echo "cross-wheel: this pair is not cross-compiled: llama.cpp builds on $TARGETARCH itself"
    exit 0
fi
case "$TARGETARCH" in
arm64) machine=aarch64 triple=aarch64-linux-gnu package=aarch64-linux-gnu ;;
amd64) machine=x86_64 triple=x86_64-linux-gnu package=x86-64-linux-gnu ;;
*)
    echo "cross-wheel: no cross compiler known for $TARGETARCH" >&2
    exit 2
    ;;
esac
for f in "$WHEELS"/llama_cpp_python-"${LLAMA_CPP_PYTHON_VERSION:?}"-*"$machine".whl; do
    if [ -f "$f" ]; then
        echo "cross-wheel: the wheels context has $(basename "$f"): nothing to cross-compile"
        exit 0
    fi
done

if [ -f "$EXTRA_CA" ]; then
    bundle=/tmp/cecai-ca-bundle.crt
    cat /etc/ssl/certs/ca-certificates.crt "$EXTRA_CA" >"$bundle" 2>/dev/null || cp "$EXTRA_CA" "$bundle"
    export PIP_CERT="$bundle" SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle"
fi
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive

apt-get update -qq
apt-get install -y -qq --no-install-recommends ca-certificates cmake make \
    "gcc-$package" "g++-$package" python3 python3-venv >/dev/null
rm -rf /var/lib/apt/lists/*

toolchain=/tmp/cross-$machine.cmake
cat >"$toolchain" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR $machine)
set(CMAKE_C_COMPILER $triple-gcc)
set(CMAKE_CXX_COMPILER $triple-g++)
# Libraries and headers of the target only; programs (the build's own tools) of the build machine.
set(CMAKE_FIND_ROOT_PATH /usr/$triple)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
EOF

venv=/tmp/cross-venv
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade "pip>=24" wheel
sdist="$WHEELS/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    "$venv/bin/pip" download --quiet --no-deps --no-binary :all: -d /tmp/sdist "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    sdist="/tmp/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
fi
echo "cross-wheel: compiling llama-cpp-python $LLAMA_CPP_PYTHON_VERSION for $machine with $triple-gcc," \
    "CMAKE_ARGS='${CMAKE_ARGS:-}'"
CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_TOOLCHAIN_FILE=$toolchain" \
    "$venv/bin/pip" wheel --quiet --no-deps -w /tmp/built "$sdist"
# scikit-build-core tags the wheel with the build machine's platform; the libraries inside are the target's.
"$venv/bin/python" -m wheel tags --remove --platform-tag "linux_$machine" /tmp/built/llama_cpp_python-*.whl >/dev/null
wheel="$(ls /tmp/built/llama_cpp_python-*"linux_$machine".whl)"
# A toolchain file that silently fell back to the host compiler would ship x86-64 libraries in an arm64 wheel.
"$venv/bin/python" - "$wheel" "$machine" <<'EOF'
import struct, sys, zipfile
wheel, machine = sys.argv[1], sys.argv[2]
expected = {"aarch64": 183, "x86_64": 62}[machine]
with zipfile.ZipFile(wheel) as zf:
    libs = [n for n in zf.namelist() if ".so" in n.rsplit("/", 1)[-1]]
    found = {n: struct.unpack_from("<H", zf.read(n), 18)[0] for n in libs}
wrong = [n for n, m in found.items() if m != expected]
if not libs or wrong:
    sys.exit(f"cross-wheel: not {machine} libraries: {wrong or 'none in the wheel'}")
print(f"cross-wheel: {len(libs)} {machine} libraries in {wheel.rsplit('/', 1)[-1]}")
EOF
mv "$wheel" "$OUT/"
