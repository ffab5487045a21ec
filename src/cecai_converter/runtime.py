"""The installed llama.cpp runtime (llama-cpp-python): what it is, what it can do, and how many layers it offloads.

One room for the answers that verification, fidelity, agreement, the check and the commands all need:

* what is installed: :func:`installed_runtime_version` (read without importing it), :func:`gpu_offload` (a CUDA
  build or not), :func:`runtime_name` (``cpu`` or ``cuda``: what manifests record and reuse decisions compare),
  :func:`runtime_facts` (the ``runtime`` of check records and references);
* the GPU-layer policy: :func:`default_gpu_layers` (all layers on a GPU pair when this runtime can offload, else
  none), :func:`gpu_layers` (the request's ``n_gpu_layers``, else that default, with a warning when a GPU pair falls
  back to the CPU), :func:`gpu_layer_count` (the ``--n-gpu-layers`` argument type) and :func:`runtime_env` (the
  GPUs hidden from a worker that offloads nothing).

llama_cpp is imported inside the functions that need it: importing it loads the native library, which the commands
that never load a model (and the tests of this module's pure parts) should not pay for.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from typing import Any, Final, Protocol

from .pairs import PairInfo

__all__ = [
    "MAX_GPU_LAYERS",
    "RequestedLayers",
    "default_gpu_layers",
    "gpu_layer_count",
    "gpu_layers",
    "gpu_offload",
    "installed_runtime_version",
    "runtime_env",
    "runtime_facts",
    "runtime_name",
]

#: The largest ``--n-gpu-layers``: far above the layers of any model (a count above a model's offloads all of it),
#: far below the 32-bit int llama.cpp reads it as (ctypes wraps a larger value silently, 1e20 becomes garbage).
MAX_GPU_LAYERS: Final = 100_000


def installed_runtime_version() -> str | None:
    """The installed llama-cpp-python version, or None when it is not installed (read without importing it)."""
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def gpu_offload() -> bool:
    """Whether the installed llama-cpp-python can offload layers to a GPU (a CUDA build on a machine with a GPU).

    Raises:
        ImportError: llama-cpp-python is not installed.
    """
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def runtime_name(n_gpu_layers: int) -> str:
    """What a llama.cpp load offloading ``n_gpu_layers`` layers runs on here: ``cuda`` or ``cpu``.

    The one answer that manifests record (verification ``runtime``, fidelity ``device``) and reuse decisions compare.
    """
    if n_gpu_layers == 0:
        return "cpu"
    return "cuda" if gpu_offload() else "cpu"


def runtime_facts(n_gpu_layers: int) -> dict[str, Any]:
    """What this machine's runtime is: device (cpu|cuda), CPU architecture, llama-cpp-python version, offload."""
    import llama_cpp

    return {
        "device": runtime_name(n_gpu_layers),
        "machine": platform.machine(),
        "llama_cpp_python": llama_cpp.__version__,
        "gpu_offload": gpu_offload(),
        "n_gpu_layers": n_gpu_layers,
    }


def runtime_env(n_gpu_layers: int) -> dict[str, str]:
    """Environment for a llama.cpp worker process that offloads ``n_gpu_layers`` layers.

    With none offloaded the GPUs are hidden: a CUDA build otherwise still moves large matrix products to the GPU,
    so a CPU pair verified or measured on a GPU machine would not be running as its own runtime does.
    """
    return {"CUDA_VISIBLE_DEVICES": ""} if n_gpu_layers == 0 else {}


def gpu_layer_count(text: str) -> int:
    """The ``--n-gpu-layers`` argument type: -1 (all layers) or 0 to :data:`MAX_GPU_LAYERS`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number of layers") from None
    if not -1 <= value <= MAX_GPU_LAYERS:
        raise argparse.ArgumentTypeError(
            f"{value if abs(value) < 10**12 else str(value)[:12] + '…'} layers: give -1 (all layers), 0 (CPU only) "
            f"or a count up to {MAX_GPU_LAYERS:,}"
        )
    return value


def default_gpu_layers(pair: PairInfo | None) -> int:
    """Layers a pair's runtime offloads by default: all (-1) on GPU pairs when this runtime can, else 0."""
    if pair is None or not pair.gpu:
        return 0
    try:
        return -1 if gpu_offload() else 0
    except ImportError:
        return 0


class RequestedLayers(Protocol):
    """What :func:`gpu_layers` reads of a request (:class:`cecai_converter.request.Request`): its option values
    by name. A protocol rather than that class: the request sits above this module, which imports nothing of it."""

    def __getitem__(self, name: str) -> Any:
        """The option's resolved value."""
        ...


def gpu_layers(request: RequestedLayers, pair: PairInfo | None, warn: Callable[[str], None]) -> int:
    """The layers ``pair``'s runtime offloads: the request's ``n_gpu_layers``, else the pair's policy.

    A GPU pair offloads everything when this llama-cpp-python has GPU support; without it, it verifies on the CPU
    and ``warn`` says so.
    """
    if request["n_gpu_layers"] is not None:
        return int(request["n_gpu_layers"])
    layers = default_gpu_layers(pair)
    if layers != 0 or pair is None or not pair.gpu or installed_runtime_version() is None:
        return layers
    warn(
        f"{pair.name} is a GPU pair but this llama-cpp-python has no GPU support: verifying on the CPU "
        "(use the pair's image, --backend docker, to verify on its runtime)"
    )
    return 0
