"""Delivery to one target: the files installed (each atomically), the computed importance matrix, the tensor-types
map, the base for the check jobs (FIDELITY_ON=check), the projector files, reference.json and the manifest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..agreement import REFERENCE_NAME
from ..card import tensor_types_name
from ..errors import ConversionFailed
from ..fsutil import atomic_write_json, atomic_write_text, install_file, sha256_file
from ..manifest import Manifest, write_manifest
from ..multimodal import MMPROJ_ROLE, mmproj_file_name
from ..output import get_logger
from ..precisions import PRECISIONS, PrecisionInfo
from ..quant_types import bits_per_weight, tensor_type_file
from ..toolchain import toolchain_info
from .job import Job, Produced, Target, Timings, file_name, layers_of
from .make import ConvertedBase, Imatrix
from .projector import ImageChecks, mmproj_wanted
from .reuse import EarlierRuns, reference_current
from .source_step import parity_record

__all__ = ["Outcome", "deliver"]

_log = get_logger("pipeline")


@dataclass(frozen=True)
class Outcome:
    """What the run made and checked, as every target's delivery reads it."""

    #: the manifest's ``source`` (with its fingerprint)
    source_record: dict[str, Any]
    base_precision: PrecisionInfo
    #: the base the converter wrote in this run (None: every file was reused)
    base: ConvertedBase | None
    imatrix: Imatrix | None
    #: the manifest's ``multimodal`` (None: a text model)
    multimodal: dict[str, Any] | None
    #: this run's comparison of the base with its source (None: not compared in this run)
    source_parity: dict[str, Any] | None
    #: per runtime (n_gpu_layers): the files and projector files as its checks left them
    checked: Mapping[int, ImageChecks]
    #: reference.json of every file (None: not asked for)
    reference: Mapping[str, Any] | None
    timings: Timings


def _ship_base(
    job: Job,
    target: Target,
    base_precision: PrecisionInfo,
    base: ConvertedBase | None,
    files: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """FIDELITY_ON=check: the base GGUF goes into the outputs folder for the check jobs, which measure fidelity
    against it (check.py); the manifest's ``base`` names it (``file``, ``sha256``). It is no published file unless
    asked for (KEEP_BASE): publish uploads the files the manifest lists.

    Raises:
        ConversionFailed: this run has no base to ship (every file was reused): ``--force`` makes it again.
    """
    name = file_name(job.model_name, base_precision)
    listed = next((f for f in files if f["name"] == name), None)
    if listed is not None:
        return {"file": name, "sha256": listed["sha256"]}
    if base is None or not base.path.is_file():
        raise ConversionFailed(
            f"fidelity-on=check: the base GGUF {name} was not made in this run, so it cannot go to the check jobs",
            hint="re-run with --force to make it again, or measure fidelity on the builder (FIDELITY_ON: builder)",
        )
    install_file(base.path, target.outputs_dir / name)
    sha = base.sha256.result() if base.sha256 is not None else sha256_file(base.path)
    return {"file": name, "sha256": sha}


def deliver(job: Job, target: Target, outcome: Outcome, earlier: EarlierRuns) -> Manifest:
    """Install this target's files and write its manifest (and reference.json); returns the manifest as written."""
    checked = outcome.checked[layers_of(job, target)]
    view = checked.files
    base_precision = outcome.base_precision
    files: list[dict[str, Any]] = []
    kept_base = job.options.keep_base
    for precision in [p for p in PRECISIONS.values() if p.name in view]:
        if not (target.wants(precision.name) or (kept_base and precision.name == base_precision.name)):
            continue
        item = view[precision.name]
        name = file_name(job.model_name, precision)
        dest = target.outputs_dir / name
        # A link at dest is never taken for the file itself: install_file refuses it (a planted link).
        if dest.is_symlink() or item.path.resolve() != dest.resolve():
            install_file(item.path, dest)
        st = dest.stat()
        files.append({
            "name": name, "precision": precision.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": item.sha256, "inputs_key": item.key, **item.facts,
            "bpw": bits_per_weight(st.st_size, item.facts.get("n_params") or 0),
            "quantization": item.quantization,
            "verification": item.verification, "fidelity": item.fidelity,
            "reused": not item.made_here,
        })  # fmt: skip
    fidelity_on = job.options.fidelity_on if job.options.fidelity else None
    imatrix = outcome.imatrix
    if imatrix is not None and imatrix.computed:
        install_file(imatrix.path, target.outputs_dir / imatrix.record["file"])
    if any((f.get("quantization") or {}).get("overrides") for f in files):
        # The overrides as llama-quantize reads them (--tensor-type-file), published with the card.
        atomic_write_text(
            target.outputs_dir / tensor_types_name(job.model_name), tensor_type_file(job.options.tensor_types)
        )
    manifest = {
        "toolchain": toolchain_info().as_manifest(),
        "pair": target.pair.name if target.pair else None,
        "model_name": job.model_name,
        "trained": job.trained,
        "source": outcome.source_record,
        "base": {
            "precision": base_precision.name,
            "kept": base_precision.name in view,
            **(_ship_base(job, target, base_precision, outcome.base, files) if fidelity_on == "check" else {}),
        },
        "fidelity_on": fidelity_on,
        "imatrix": imatrix.record if imatrix is not None else None,
        "files": files,
        "timings": outcome.timings.record(),
        "runtime": {"n_gpu_layers": layers_of(job, target)},
        "request": target.request,
        "multimodal": outcome.multimodal,
        "mmproj": _deliver_mmproj(job, target, checked.projectors),
        "source_parity": parity_record(
            job.options, outcome.source_parity, earlier, outcome.source_record, base_precision
        ),
    }
    reference = outcome.reference
    if reference is not None:
        names = {f["name"] for f in files}
        own = {**reference, "files": {n: e for n, e in reference["files"].items() if n in names}}
        atomic_write_json(target.outputs_dir / REFERENCE_NAME, own)
    elif not reference_current(target.outputs_dir, {f["name"]: f["sha256"] for f in files}):
        # A reference of earlier bytes would make every later check fail with "other bytes": none is better.
        (target.outputs_dir / REFERENCE_NAME).unlink(missing_ok=True)
    written = write_manifest(target.outputs_dir, manifest)
    _log.info("wrote %s", written.path)
    # Files of earlier runs that this run no longer asked for are left alone; the manifest lists this run's files.
    return written


def _deliver_mmproj(job: Job, target: Target, projectors: Mapping[str, Produced]) -> list[dict[str, Any]] | None:
    """Install the projector files in ``target`` and give their manifest entries (None: no projector)."""
    if not projectors:
        return None
    entries: list[dict[str, Any]] = []
    for name, item in projectors.items():
        if not mmproj_wanted(target, name):
            continue
        dest = target.outputs_dir / mmproj_file_name(job.model_name, name)
        if dest.is_symlink() or item.path.resolve() != dest.resolve():
            install_file(item.path, dest)
        st = dest.stat()
        entries.append({
            "name": dest.name, "precision": name, "role": MMPROJ_ROLE, "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns, "sha256": item.sha256, "inputs_key": item.key, **item.facts,
            "verification": item.verification, "reused": not item.made_here,
        })  # fmt: skip
    return entries
