"""What the pipeline is asked (Job, Target) and the typed results its steps hand to one another.

Each step of :func:`cecai_converter.pipeline.run.run_job` takes what earlier steps returned and returns its own
result; :class:`Timings` is the one thing they add to as they go, passed to the steps that take time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pairs import PairInfo
from ..precisions import PrecisionInfo
from ..request_options import Options

__all__ = ["FACT_KEYS", "Job", "Produced", "Target", "Timings", "file_name", "layers_of", "runtimes"]

#: a file's header facts the manifest records (read back from every file, made or reused)
FACT_KEYS = ("tensor_count", "architecture", "file_type", "n_params")


@dataclass(frozen=True)
class Target:
    """One outputs folder to fill, with its pair (if any) and its log file."""

    outputs_dir: Path
    pair: PairInfo | None = None
    log_file: Path | None = None
    #: the precision names this target wants; None means every precision of the job
    precisions: tuple[str, ...] | None = None
    #: layers its runtime offloads when verifying and measuring (-1 all); None: the job's Options.n_gpu_layers.
    #: Targets of one job share the files, but each runtime loads and measures them itself.
    n_gpu_layers: int | None = None
    #: the resolved request this target was made for, as the manifest records it under ``request``
    #: (``{"values": …, "sources": …}``, see :meth:`cecai_converter.request.Request.record`)
    request: Mapping[str, Any] | None = None

    def wants(self, name: str) -> bool:
        """Whether this target asked for the precision ``name``."""
        return self.precisions is None or name in self.precisions


@dataclass(frozen=True)
class Job:
    """One model to convert to some precisions, for one or more targets.

    Attributes:
        model: a local folder, or a Hub repo id (``owner/name``) when ``hub`` is True.
        model_name: the stem of every output file.
        precisions: the requested types.
        targets: where the files go.
        revision: the Hub revision (branch, tag or commit).
        trained: TRAINED from the configuration, recorded in the manifest.
    """

    model: str
    model_name: str
    precisions: tuple[PrecisionInfo, ...]
    targets: tuple[Target, ...]
    options: Options = field(default_factory=Options)
    hub: bool = False
    revision: str | None = None
    trained: bool | None = None


@dataclass(frozen=True)
class Produced:
    """A file of this run, made here or found current in an earlier run's folder, as the checks and the delivery
    see it. The checks return new ones (``dataclasses.replace``) with their verification or fidelity added."""

    path: Path
    precision: PrecisionInfo
    #: what its bytes depend on (manifest.inputs_key)
    key: str
    sha256: str
    #: its header facts (FACT_KEYS)
    facts: Mapping[str, Any]
    verification: Mapping[str, Any] | None = None
    fidelity: Mapping[str, Any] | None = None
    made_here: bool = True
    #: the folder an earlier run left it in (None: made here)
    origin: Path | None = None
    #: what llama.cpp really wrote (the manifest's ``quantization``); None for a projector
    quantization: Mapping[str, Any] | None = None


class Timings:
    """The run's timings, the manifest's ``timings``: what each step took, recorded as the steps run.

    The one record the steps add to; they are given it explicitly. Per-precision and per-runtime steps record
    under their group (``quantize_s``, ``verify_s``…), the others under their own key.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] = {"quantize_s": {}, "verify_s": {}, "fidelity_s": {}}

    def took(self, key: str, t0: float, label: str | None = None) -> None:
        """Record the seconds since ``t0`` (a ``time.perf_counter()``) as ``key``, or as ``label`` in ``key``."""
        self.set(key, round(time.perf_counter() - t0, 3), label)

    def set(self, key: str, value: Any, label: str | None = None) -> None:
        """Record ``value`` as ``key``, or as ``label`` in the group ``key``."""
        if label is None:
            self._values[key] = value
        else:
            self._values.setdefault(key, {})[label] = value

    def record(self) -> dict[str, Any]:
        """The manifest's ``timings``."""
        return self._values


def file_name(model_name: str, precision: PrecisionInfo) -> str:
    """The GGUF file of ``precision``: ``<model>.<suffix>.gguf``."""
    return f"{model_name}.{precision.suffix}.gguf"


def layers_of(job: Job, target: Target) -> int:
    """The layers ``target``'s runtime offloads (its own setting, else the job's)."""
    return job.options.n_gpu_layers if target.n_gpu_layers is None else target.n_gpu_layers


def runtimes(job: Job) -> dict[int, list[Target]]:
    """The job's targets grouped by the layers their runtime offloads, in target order."""
    groups: dict[int, list[Target]] = {}
    for target in job.targets:
        groups.setdefault(layers_of(job, target), []).append(target)
    return groups
