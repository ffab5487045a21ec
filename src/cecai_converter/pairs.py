"""The four hardware pairs: what each one is, where it runs and which image serves it.

A *pair* is a target runtime (llama-cpp-python built for some hardware). The GGUF bytes do not depend on the pair;
what differs is where the file is verified, which image converts it and which runners a CI job needs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from .errors import UsageError

__all__ = ["DEFAULT_PAIR", "PAIRS", "PairInfo", "parse_pair"]


@dataclass(frozen=True)
class PairInfo:
    """One hardware pair.

    Attributes:
        name: the folder and key name users write (``GPU_LLM_LLAMA``).
        slug: the short name used by images, nox sessions and scripts (``gpu``).
        platform: the container platform its image is built for.
        accelerator: ``cpu``, ``cuda`` (x86-64 with an NVIDIA GPU) or ``jetson`` (L4T, the nvidia runtime).
        runner_labels: the default GitHub runner labels that route a job to this hardware.
        build_base_image: the image llama-cpp-python is built on (``BUILD_BASE_IMAGE`` in images/Dockerfile).
        ship_base_image: the image the pair's image is shipped on (``SHIP_BASE_IMAGE``): a runtime without the
            compilers where one exists (CUDA), the same image where the runtime needs the whole SDK (JetPack).
        cmake_args: llama.cpp's CMake flags for the pair (``CMAKE_ARGS``).
        cross_compile: llama.cpp may be cross-compiled on a build machine of another architecture (CPU-only
            builds); a CUDA build needs the pair's own SDK, so it compiles on (or emulates) the pair's platform.
        docker_gpus: containers need every GPU (``docker run --gpus all``, the NVIDIA Container Toolkit).
        docker_runtime: the OCI runtime containers need (``nvidia`` on Jetson, whose GPU is not a PCI device), or
            ``None`` for the engine's default.
        description: the image's ``org.opencontainers.image.description``.
    """

    name: str
    slug: str
    platform: str
    accelerator: str
    runner_labels: tuple[str, ...]
    build_base_image: str = "python:3.11-slim-bookworm"
    ship_base_image: str = "python:3.11-slim-bookworm"
    cmake_args: tuple[str, ...] = ("-DGGML_NATIVE=OFF",)
    cross_compile: bool = False
    docker_gpus: bool = False
    docker_runtime: str | None = None
    description: str = ""

    @property
    def config_filename(self) -> str:
        """The pair's configuration file, ``converter_args_<pair in lower case>.yaml``."""
        return f"converter_args_{self.name.lower()}.yaml"

    @property
    def gpu(self) -> bool:
        """Whether the pair's runtime offloads to a GPU (CUDA on x86-64, or Jetson's)."""
        return self.accelerator != "cpu"

    @property
    def arch(self) -> str:
        """The platform's architecture as Docker names it (``amd64``, ``arm64``): the runner a build needs."""
        return self.platform.rpartition("/")[2]

    @property
    def build_args(self) -> dict[str, str]:
        """The build arguments images/Dockerfile takes for this pair; docker-bake.hcl and scripts pass these."""
        return {
            "PAIR": self.name,
            "DESCRIPTION": self.description,
            "BUILD_BASE_IMAGE": self.build_base_image,
            "SHIP_BASE_IMAGE": self.ship_base_image,
            "CMAKE_ARGS": " ".join(self.cmake_args),
            "CROSS_COMPILE": "1" if self.cross_compile else "0",
            # The NVIDIA runtime exposes GPUs to containers whose image asks for them; a CPU image asks for none.
            "NVIDIA_VISIBLE_DEVICES": "all" if self.accelerator != "cpu" else "",
        }


#: Base images: Debian bookworm's Python (3.11, the torch wheels' Python) for the CPU pairs; CUDA 12.6 on Ubuntu
#: 24.04 (devel to build, runtime to ship); JetPack 6 (L4T r36), which does not take CUDA from the host, for Orin.
_PYTHON_SLIM: Final = "python:3.11-slim-bookworm"
_CUDA_DEVEL: Final = "nvidia/cuda:12.6.3-devel-ubuntu24.04"
_CUDA_RUNTIME: Final = "nvidia/cuda:12.6.3-runtime-ubuntu24.04"
_JETPACK: Final = "nvcr.io/nvidia/l4t-jetpack:r36.4.0"
#: No native tuning anywhere: a native build bakes the build machine's CPU features in and can SIGILL elsewhere.
_PORTABLE_ARM: Final = ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a")

PAIRS: Final[MappingProxyType[str, PairInfo]] = MappingProxyType(
    {
        p.name: p
        for p in (
            PairInfo(
                "CPU_LLM_LLAMA",
                "cpu",
                "linux/amd64",
                "cpu",
                ("self-hosted", "linux", "X64"),
                build_base_image=_PYTHON_SLIM,
                ship_base_image=_PYTHON_SLIM,
                cmake_args=("-DGGML_NATIVE=OFF",),
                cross_compile=True,
                description="Hugging Face models to verified, quantized GGUF for llama-cpp-python on x86-64 CPUs",
            ),
            PairInfo(
                "GPU_LLM_LLAMA",
                "gpu",
                "linux/amd64",
                "cuda",
                ("self-hosted", "linux", "X64", "gpu"),
                build_base_image=_CUDA_DEVEL,
                ship_base_image=_CUDA_RUNTIME,
                # llama.cpp's default CUDA architecture list; the devel image's driver stub satisfies the link.
                cmake_args=("-DGGML_CUDA=on", "-DGGML_NATIVE=OFF", "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc"),
                docker_gpus=True,
                description="Hugging Face models to verified, quantized GGUF for llama-cpp-python with CUDA",
            ),
            PairInfo(
                "ARM_LLM_LLAMA",
                "arm",
                "linux/arm64",
                "cpu",
                ("self-hosted", "linux", "ARM64"),
                build_base_image=_PYTHON_SLIM,
                ship_base_image=_PYTHON_SLIM,
                cmake_args=_PORTABLE_ARM,
                cross_compile=True,
                description="Hugging Face models to verified, quantized GGUF for llama-cpp-python on arm64 CPUs",
            ),
            PairInfo(
                "AGX_ORIN_LLM_LLAMA",
                "agx-orin",
                "linux/arm64",
                "jetson",
                ("self-hosted", "linux", "ARM64", "agx-orin"),
                build_base_image=_JETPACK,
                ship_base_image=_JETPACK,
                # Orin's GPU is sm_87, which is not in llama.cpp's default CUDA architecture list.
                cmake_args=(
                    "-DGGML_CUDA=on",
                    *_PORTABLE_ARM,
                    "-DCMAKE_CUDA_ARCHITECTURES=87",
                    "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc",
                ),
                docker_runtime="nvidia",
                description="Hugging Face models to verified, quantized GGUF for llama-cpp-python on Jetson AGX "
                "Orin (JetPack 6)",
            ),
        )
    }
)

#: The pair of a conversion that names none: the docker backend's image for `convert`, the demo's pair, and the
#: runners of a release's builder (make) jobs.
DEFAULT_PAIR: Final = "CPU_LLM_LLAMA"


def parse_pair(value: str) -> PairInfo:
    """Resolve a pair by its name (``CPU_LLM_LLAMA``) or slug (``cpu``), case-insensitively.

    Raises:
        UsageError: not a known pair; the message names the closest one.
    """
    key = value.strip()
    for info in PAIRS.values():
        if key.upper() == info.name or key.lower() == info.slug:
            return info
    names = [*PAIRS, *(p.slug for p in PAIRS.values())]
    close = difflib.get_close_matches(key.upper(), list(PAIRS), n=1, cutoff=0.6)
    suggestion = f" Did you mean {close[0]}?" if close else ""
    raise UsageError(f"unknown pair {value!r}.{suggestion}", hint=f"known pairs: {', '.join(names)}")
