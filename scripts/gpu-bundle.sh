#!/usr/bin/env bash
# Pack what scripts/gpu-check.sh needs on a GPU machine that reaches no package index, into .gpu/ (git-ignored):
#   .gpu/src.tar.gz        the pinned llama-cpp-python sdist, checksum-verified, minus what a CUDA build never reads
#                          (vocab test models, docs, tests, other GPU back ends, git history): 77 MB -> about 7 MB
#   .gpu/wheels/           the pure-Python packages a stock CUDA/PyTorch image lacks (gguf, diskcache)
#   .gpu/toolchain/        the pinned converter, extracted (CECAI_TOOLCHAIN_DIR there)
# Run it after `./dev test` or `./dev demo` has installed .venv and fetched the toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
VERSION=$("$PY" -c 'from cecai_converter.toolchain import LLAMA_CPP_PYTHON_VERSION as v; print(v)')
GGUF=$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')
SDIST=$("$PY" -c 'from cecai_converter.toolchain import sdist_path; print(sdist_path(fetch=False))')
CONVERTER=$("$PY" -c 'from cecai_converter.toolchain import ensure_converter; print(ensure_converter(fetch=False))')

rm -rf .gpu && mkdir -p .gpu/wheels ".gpu/toolchain/llama-cpp-python-$VERSION"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$SDIST" -C "$work"
tree="$work/llama_cpp_python-$VERSION"
rm -rf "$tree/.git" "$tree/vendor/llama.cpp/.git" "$tree/examples"
(cd "$tree/vendor/llama.cpp" && rm -rf models docs media benches tests examples tools/ui \
    ggml/src/ggml-hexagon ggml/src/ggml-sycl ggml/src/ggml-opencl ggml/src/ggml-vulkan ggml/src/ggml-cann \
    ggml/src/ggml-musa)
tar -czf .gpu/src.tar.gz -C "$work" "llama_cpp_python-$VERSION"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d .gpu/wheels "gguf==$GGUF" "diskcache==5.6.3"
cp -r "$CONVERTER" ".gpu/toolchain/llama-cpp-python-$VERSION/converter"
du -sh .gpu
