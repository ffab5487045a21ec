# Images for the four hardware pairs, from one multi-stage file (images/Dockerfile); one target per pair.
#
#   docker buildx bake                      every pair (group default)
#   docker buildx bake amd64 | arm64        the pairs one runner architecture builds natively
#   docker buildx bake cpu --print          the resolved build definition
#   VERSION=0.2.0 OWNER=me docker buildx bake cpu --push
#
# Tags: ${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-<pair slug>, e.g. ghcr.io/cecai/cecai-converter:0.1.0-gpu
# (the docker backend's default tag for a pair; CECAI_IMAGE_REPO / CECAI_IMAGE_TEMPLATE point it elsewhere).
# Build arm64 images on arm64 runners: compiling llama.cpp under QEMU is very slow and has crashed upstream.

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
# The project version (pyproject.toml); a test keeps them equal.
variable "VERSION" {
  default = "0.1.0"
}
# The commit the image is built from (org.opencontainers.image.revision); CI sets it from GITHUB_SHA.
variable "REVISION" {
  default = "unknown"
}
variable "SOURCE_URL" {
  default = "https://github.com/${OWNER}/${IMAGE_NAME}"
}
# The llama.cpp pin (toolchain.LLAMA_CPP_PYTHON_VERSION); a test keeps them equal.
variable "LLAMA_CPP_PYTHON_VERSION" {
  default = "0.3.36"
}
variable "TORCH_VERSION" {
  default = "2.13.0"
}
# Base images: null keeps the Dockerfile's default (see the ARGs at the top of images/Dockerfile).
variable "CPU_BASE_IMAGE" {
  default = null
}
variable "ARM_BASE_IMAGE" {
  default = null
}
variable "CUDA_DEVEL_IMAGE" {
  default = null
}
variable "CUDA_RUNTIME_IMAGE" {
  default = null
}
variable "L4T_DEVEL_IMAGE" {
  default = null
}
variable "L4T_RUNTIME_IMAGE" {
  default = null
}
# A folder of wheels (prebuilt llama-cpp-python for the target, torch, the sdist); empty: build from source.
variable "WHEELS_DIR" {
  default = ""
}
# An extra CA bundle for TLS-intercepting proxies, passed as the `ca` build secret; empty: none.
variable "CA_FILE" {
  default = ""
}
# Set to "true" by GitHub Actions itself: turns on the GitHub Actions cache (one scope per target).
variable "GITHUB_ACTIONS" {
  default = ""
}

# -- shared settings --------------------------------------------------------------------------------------------
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

# -- groups -------------------------------------------------------------------------------------------------------
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
# GitHub's cache holds 10 GB per repository: the CPU images export every layer (mode=max); the CUDA and L4T ones
# only their final layers (mode=min), since their devel stages alone run to several GB.
target "cpu" {
  inherits  = ["_common"]
  target    = "cpu"
  platforms = ["linux/amd64"]
  args = {
    CPU_BASE_IMAGE = CPU_BASE_IMAGE
  }
  tags       = ["${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-cpu"]
  cache-from = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-cpu"] : []
  cache-to   = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-cpu,mode=max"] : []
}

target "gpu" {
  inherits  = ["_common"]
  target    = "gpu"
  platforms = ["linux/amd64"]
  args = {
    CUDA_DEVEL_IMAGE   = CUDA_DEVEL_IMAGE
    CUDA_RUNTIME_IMAGE = CUDA_RUNTIME_IMAGE
  }
  tags       = ["${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-gpu"]
  cache-from = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-gpu"] : []
  cache-to   = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-gpu,mode=min"] : []
}

target "arm" {
  inherits  = ["_common"]
  target    = "arm"
  platforms = ["linux/arm64"]
  args = {
    ARM_BASE_IMAGE = ARM_BASE_IMAGE
  }
  tags       = ["${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-arm"]
  cache-from = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-arm"] : []
  cache-to   = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-arm,mode=max"] : []
}

target "agx-orin" {
  inherits  = ["_common"]
  target    = "agx-orin"
  platforms = ["linux/arm64"]
  args = {
    L4T_DEVEL_IMAGE   = L4T_DEVEL_IMAGE
    L4T_RUNTIME_IMAGE = L4T_RUNTIME_IMAGE
  }
  tags       = ["${REGISTRY}/${OWNER}/${IMAGE_NAME}:${VERSION}-agx-orin"]
  cache-from = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-agx-orin"] : []
  cache-to   = GITHUB_ACTIONS == "true" ? ["type=gha,scope=cecai-converter-agx-orin,mode=min"] : []
}
