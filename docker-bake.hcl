# GENERATED from src/cecai_converter/pairs.py by `python -m cecai_converter.images --write`: edit the pair
# table and regenerate; tests/test_images_static.py fails while this file is stale.
# Images for the hardware pairs, one build chain (images/Dockerfile) driven by build arguments.
#
#   docker buildx bake                      every pair (group default)
#   docker buildx bake amd64 | arm64        the pairs one runner architecture builds
#   docker buildx bake cpu --print          the resolved build definition
#   VERSION=0.2.0 OWNER=me docker buildx bake cpu --push
#
# Tags: ${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-<pair slug>, the docker backend's default tag for the pair
# (container_spec.default_image; CECAI_IMAGE_REPO / CECAI_IMAGE_TEMPLATE point the backend elsewhere).

# -- variables (environment variables of the same name override them) -------------------------------------------
variable "REGISTRY" {
  default = "ghcr.io"
}
variable "OWNER" {
  default = "cecai"
}
variable "IMAGE_NAME" {
  default = "cecai-converter"
}
# The project version (cecai_converter.__version__).
variable "VERSION" {
  default = "0.1.0"
}
# The commit the image is built from (org.opencontainers.image.revision).
variable "REVISION" {
  default = "unknown"
}
variable "SOURCE_URL" {
  default = "https://github.com/${OWNER}/${IMAGE_NAME}"
}
# The llama.cpp pin (toolchain.py).
variable "LLAMA_CPP_PYTHON_VERSION" {
  default = "0.3.36"
}
# pyproject's torch pin.
variable "TORCH_VERSION" {
  default = "2.13.0"
}
# A folder of wheels (a prebuilt llama-cpp-python for the target, torch, the sdist); empty: none.
variable "WHEELS_DIR" {
  default = ""
}
# An extra CA bundle (TLS-intercepting proxies), passed as the `ca` secret.
variable "CA_FILE" {
  default = ""
}
# Set to "true" by GitHub Actions: the gha cache, one scope per target.
variable "GITHUB_ACTIONS" {
  default = ""
}
# CPU_LLM_LLAMA's bases.
variable "CPU_BUILD_BASE_IMAGE" {
  default = "python:3.11-slim-bookworm"
}
variable "CPU_SHIP_BASE_IMAGE" {
  default = "python:3.11-slim-bookworm"
}
# GPU_LLM_LLAMA's bases.
variable "GPU_BUILD_BASE_IMAGE" {
  default = "nvidia/cuda:12.6.3-devel-ubuntu24.04"
}
variable "GPU_SHIP_BASE_IMAGE" {
  default = "nvidia/cuda:12.6.3-runtime-ubuntu24.04"
}
# ARM_LLM_LLAMA's bases.
variable "ARM_BUILD_BASE_IMAGE" {
  default = "python:3.11-slim-bookworm"
}
variable "ARM_SHIP_BASE_IMAGE" {
  default = "python:3.11-slim-bookworm"
}
# AGX_ORIN_LLM_LLAMA's bases.
variable "AGX_ORIN_BUILD_BASE_IMAGE" {
  default = "nvcr.io/nvidia/l4t-jetpack:r36.4.0"
}
variable "AGX_ORIN_SHIP_BASE_IMAGE" {
  default = "nvcr.io/nvidia/l4t-jetpack:r36.4.0"
}

# -- shared settings ---------------------------------------------------------------------------------------------
target "_common" {
  context    = "."
  dockerfile = "images/Dockerfile"
  args = {
    VERSION                  = VERSION
    REVISION                 = REVISION
    SOURCE_URL               = SOURCE_URL
    LLAMA_CPP_PYTHON_VERSION = LLAMA_CPP_PYTHON_VERSION
    TORCH_VERSION            = TORCH_VERSION
  }
  contexts = WHEELS_DIR != "" ? { wheels = WHEELS_DIR } : {}
  secret   = CA_FILE != "" ? ["id=ca,src=${CA_FILE}"] : []
}

# -- groups: every pair, and the pairs of each runner architecture ----------------------------------------------
group "default" {
  targets = ["cpu", "gpu", "arm", "agx-orin"]
}
group "amd64" {
  targets = ["cpu", "gpu"]
}
group "arm64" {
  targets = ["arm", "agx-orin"]
}

# -- one target per pair ----------------------------------------------------------------------------------------
# GitHub's cache holds 10 GB per repository: CPU images export every layer (mode=max), the CUDA and L4T
# ones only their final layers (mode=min), since their devel stages alone run to several GB.

target "cpu" {
  inherits  = ["_common"]
  platforms = ["linux/amd64"]
  args = {
    PAIR                   = "CPU_LLM_LLAMA"
    DESCRIPTION            = "Hugging Face models to verified, quantized GGUF for llama-cpp-python on x86-64 CPUs"
    BUILD_BASE_IMAGE       = CPU_BUILD_BASE_IMAGE
    SHIP_BASE_IMAGE        = CPU_SHIP_BASE_IMAGE
    CMAKE_ARGS             = "-DGGML_NATIVE=OFF"
    CROSS_COMPILE          = "1"
    NVIDIA_VISIBLE_DEVICES = ""
  }
  tags       = ["${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-cpu"]
  cache-from = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-cpu"] : []
  cache-to   = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-cpu,mode=max"] : []
}

target "gpu" {
  inherits  = ["_common"]
  platforms = ["linux/amd64"]
  args = {
    PAIR                   = "GPU_LLM_LLAMA"
    DESCRIPTION            = "Hugging Face models to verified, quantized GGUF for llama-cpp-python with CUDA"
    BUILD_BASE_IMAGE       = GPU_BUILD_BASE_IMAGE
    SHIP_BASE_IMAGE        = GPU_SHIP_BASE_IMAGE
    CMAKE_ARGS             = "-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc"
    CROSS_COMPILE          = "0"
    NVIDIA_VISIBLE_DEVICES = "all"
  }
  tags       = ["${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-gpu"]
  cache-from = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-gpu"] : []
  cache-to   = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-gpu,mode=min"] : []
}

target "arm" {
  inherits  = ["_common"]
  platforms = ["linux/arm64"]
  args = {
    PAIR                   = "ARM_LLM_LLAMA"
    DESCRIPTION            = "Hugging Face models to verified, quantized GGUF for llama-cpp-python on arm64 CPUs"
    BUILD_BASE_IMAGE       = ARM_BUILD_BASE_IMAGE
    SHIP_BASE_IMAGE        = ARM_SHIP_BASE_IMAGE
    CMAKE_ARGS             = "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a"
    CROSS_COMPILE          = "1"
    NVIDIA_VISIBLE_DEVICES = ""
  }
  tags       = ["${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-arm"]
  cache-from = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-arm"] : []
  cache-to   = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-arm,mode=max"] : []
}

target "agx-orin" {
  inherits  = ["_common"]
  platforms = ["linux/arm64"]
  args = {
    PAIR                   = "AGX_ORIN_LLM_LLAMA"
    DESCRIPTION            = "Hugging Face models to verified, quantized GGUF for llama-cpp-python on Jetson AGX Orin (JetPack 6)"
    BUILD_BASE_IMAGE       = AGX_ORIN_BUILD_BASE_IMAGE
    SHIP_BASE_IMAGE        = AGX_ORIN_SHIP_BASE_IMAGE
    CMAKE_ARGS             = "-DGGML_CUDA=on -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a -DCMAKE_CUDA_ARCHITECTURES=87 -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc"
    CROSS_COMPILE          = "0"
    NVIDIA_VISIBLE_DEVICES = "all"
  }
  tags       = ["${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-agx-orin"]
  cache-from = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-agx-orin"] : []
  cache-to   = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-agx-orin,mode=min"] : []
}
