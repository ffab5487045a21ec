#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, CUDA's compiler and PyTorch, and no package index: build the pinned
# llama-cpp-python with CUDA from .gpu/ (scripts/gpu-bundle.sh), then run the GPU tests (tests/test_gpu_runtime.py)
# a GPU_LLM_LLAMA conversion, and `cecai-convert check --pair GPU_LLM_LLAMA` of the CPU conversion's files against
# its CPU reference. Results and logs go to $OUT (default ./gpu-check-out).
#
#   CUDA_ARCH   compute capability to build for (default 90: H100/H200); the AGX Orin image uses 87
#
# FlashAttention kernels are left out of this check's build (GGML_CUDA_FA=OFF) to fit it in minutes; the images
# build them. A second call on the same machine reuses the build.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
SITE=/tmp/cecai-gpu-site
mkdir -p "$OUT"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

echo "$(date +%T) start"
if [ ! -f "$SITE/.built" ]; then
    rm -rf "$SITE" /tmp/cecai-gpu-src && mkdir -p "$SITE" /tmp/cecai-gpu-src
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/wheels/*.whl
    tar -xzf .gpu/src.tar.gz -C /tmp/cecai-gpu-src
    start=$(date +%s)
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DGGML_CUDA_FA=OFF -DGGML_NATIVE=OFF \
-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        python3 -m pip install --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" \
        /tmp/cecai-gpu-src/llama_cpp_python-* >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    echo "built llama-cpp-python with CUDA in $(($(date +%s) - start)) s" | tee -a "$OUT/gpu.txt"
    touch "$SITE/.built"
fi
export PYTHONPATH="$SITE:$PWD/src" CECAI_TOOLCHAIN_DIR="$PWD/.gpu/toolchain" PYTHONUNBUFFERED=1
python3 -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "GPU offload:",
llama_cpp.llama_supports_gpu_offload())' | tee -a "$OUT/gpu.txt"
python3 -m cecai_converter toolchain | tee -a "$OUT/gpu.txt"

# The stock image's warnings are not this project's: report them, do not fail on them.
set +e  # from here on every step runs, and the status says whether any failed
# CECAI_REQUIRE=gpu: a runtime that cannot offload fails the GPU tests here instead of skipping them.
CECAI_REQUIRE=gpu python3 -m pytest -p no:cacheprovider -o filterwarnings=default -o addopts="" -rA -v \
    tests/test_gpu_runtime.py 2>&1 | tee "$OUT/pytest.txt"
status=${PIPESTATUS[0]}

# One real conversion of the embedded "small" model for each runtime, fidelity on: manifests and reports kept.
# CONVERSIONS=0 skips it (the tests alone, when device time is short).
[ "${CONVERSIONS:-1}" = 0 ] && exit "$status"
work=$(mktemp -d)
python3 -m cecai_converter demo --workdir "$work" --size small --no-fidelity >"$OUT/convert.log" 2>&1 || status=1
model=$(find "$work" -mindepth 4 -maxdepth 4 -type d -path '*/models/*' | head -1)
for pair in GPU_LLM_LLAMA CPU_LLM_LLAMA; do
    python3 -m cecai_converter convert "$model" --pair "$pair" --precision Q8_0 --precision Q4_K_M \
        --precision Q2_K --outdir "$work/$pair" >>"$OUT/convert.log" 2>&1 || status=1
    cp "$work/$pair/manifest.json" "$OUT/manifest-$pair.json" || status=1
    python3 -m cecai_converter report "$work/$pair" >"$OUT/report-$pair.md" 2>&1 || status=1
done
cat "$OUT"/report-*.md
# Make once, check everywhere: the CPU conversion's files (and its CPU reference.json) checked on the CUDA runtime,
# as the release flow's GPU check job does. KL-divergence and top-1 against the CPU runtime on the same bytes.
python3 -m cecai_converter check "$work/CPU_LLM_LLAMA" --pair GPU_LLM_LLAMA --record "$OUT/check-gpu.json" \
    2>&1 | tee "$OUT/check-gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit "$status"
