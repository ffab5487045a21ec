"""Towers beyond the text model (multimodal.py): the plan (projector, refusal or text only), the refusal of
multi-token-prediction heads the file lacks, and the projector files: made or reused, and shown the test image."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..convert import run_converter
from ..errors import ConversionFailed
from ..fsutil import sha256_file
from ..gguf_header import read_header
from ..manifest import Manifest, file_is_current, inputs_key
from ..multimodal import detect_towers, image_check_many, mmproj_file_name, mmproj_precisions, mtp_refusal, plan_towers
from ..output import Output
from ..precisions import PRECISIONS
from ..source import ModelSource
from ..toolchain import toolchain_info
from ..verify import read_back
from .job import FACT_KEYS, Job, Produced, Target, Timings
from .reuse import EarlierRuns

__all__ = [
    "ImageChecks",
    "check_images",
    "check_mtp",
    "mmproj_current",
    "mmproj_wanted",
    "plan_projector",
    "produce_mmproj",
]


def plan_projector(job: Job, source: ModelSource, converter_dir: Path, out: Output) -> dict[str, Any] | None:
    """Detect the towers beyond the text model and decide: projector, refusal (raised), or text only (recorded).

    Returns the manifest's ``multimodal`` (None: a text model).
    """
    towers = detect_towers(source.path, source.config, converter_dir)
    plan = plan_towers(towers, text_only=job.options.text_only)
    if plan is not None and plan["left_out"]:
        out.warning(
            f"TEXT_ONLY: publishing the text model alone; left out: {', '.join(plan['left_out'])} "
            "(recorded in the manifest and the card)"
        )
    return plan


def check_mtp(
    job: Job,
    source: ModelSource,
    converter_dir: Path,
    multimodal: Mapping[str, Any] | None,
    files: Mapping[str, Produced],
) -> None:
    """Refuse multi-token-prediction heads that the converted file does not hold (known only from the file)."""
    if multimodal is None or "mtp" not in multimodal["towers"] or not files:
        return
    towers = detect_towers(source.path, source.config, converter_dir)
    metadata = read_header(next(iter(files.values())).path).metadata
    refusal = mtp_refusal(towers, metadata, text_only=job.options.text_only)
    if refusal is not None:
        raise refusal


def _mmproj_keys(job: Job, multimodal: Mapping[str, Any] | None, fingerprint: str) -> dict[str, str]:
    """The projector files this job writes (F16, and Q8_0 when asked) → what their bytes depend on."""
    if multimodal is None or not multimodal["projector"]:
        return {}
    toolchain = toolchain_info().as_manifest()
    return {
        name: inputs_key(source=fingerprint, precision=name, toolchain=toolchain, made="converter --mmproj")
        for name in mmproj_precisions([p.name for p in job.precisions])
    }


def mmproj_wanted(target: Target, name: str) -> bool:
    """F16 goes to every target; Q8_0 to the targets that asked for Q8_0."""
    return name == "F16" or target.wants(name)


def mmproj_current(
    job: Job, multimodal: Mapping[str, Any] | None, target: Target, manifest: Manifest, fingerprint: str
) -> bool:
    """Whether ``manifest`` (the target's, from an earlier run) lists every projector file this job writes, current,
    and nothing was left out that this run would now export (or the reverse)."""
    if manifest.multimodal != multimodal:
        return False
    entries = {e.precision: e for e in manifest.mmproj or []}
    return all(
        name in entries and file_is_current(entries[name], target.outputs_dir, key)
        for name, key in _mmproj_keys(job, multimodal, fingerprint).items()
        if mmproj_wanted(target, name)
    )


def produce_mmproj(
    job: Job,
    source: ModelSource,
    converter_dir: Path,
    multimodal: Mapping[str, Any] | None,
    fingerprint: str,
    stage: Path,
    earlier: EarlierRuns,
    out: Output,
    timings: Timings,
) -> dict[str, Produced]:
    """Write the projector files (``convert_hf_to_gguf.py --mmproj``), or reuse current ones from an earlier run."""
    projectors: dict[str, Produced] = {}
    for name, key in _mmproj_keys(job, multimodal, fingerprint).items():
        precision = PRECISIONS[name]
        file_name = mmproj_file_name(job.model_name, name)
        existing = None if job.options.force else earlier.find_projector(key, precision)
        if existing is None:
            path = stage / file_name
            with out.step(f"exporting the multimodal projector ({file_name})"):
                t0 = time.perf_counter()
                run_converter(
                    converter_dir, source, path, name.lower(), model_name=job.model_name, mmproj=True,
                    on_tensor=lambda n: out.progress(f"    converting projector tensor {n}"),
                )  # fmt: skip
                timings.took("mmproj_s", t0, name)
            facts = read_back(path)
            if facts.architecture != "clip":
                raise ConversionFailed(
                    f"{file_name}: the converter wrote a {facts.architecture!r} file, not a projector ('clip')",
                    hint="nothing was published; the log has the converter's output",
                )
            existing = Produced(
                path=path, precision=precision, key=key, sha256=sha256_file(path),
                facts={k: getattr(facts, k) for k in FACT_KEYS},
            )  # fmt: skip
        projectors[name] = existing
    return projectors


@dataclass(frozen=True)
class ImageChecks:
    """One runtime's image check: the text files (the F16 projector's answer in ``verification.image``) and the
    projector files (each with the first answer it gave)."""

    files: dict[str, Produced]
    projectors: dict[str, Produced]


def check_images(
    job: Job,
    view: Mapping[str, Produced],
    projectors: Mapping[str, Produced],
    n_gpu_layers: int,
    label: str,
    out: Output,
    timings: Timings,
) -> ImageChecks:
    """Show the test image to the text files of ``view`` through the projector, on one runtime.

    Every text file answers with the F16 projector (its ``verification.image``); the Q8_0 projector answers with the
    Q8_0 text file, else the first one. Each projector records the first answer it gave.
    """
    texts = [name for name, item in view.items() if item.verification is not None]
    if not projectors or not texts or not job.options.verify:
        return ImageChecks(dict(view), dict(projectors))
    pairs: list[tuple[str, str]] = []
    for name in projectors:
        chosen = texts if name == "F16" else [name if name in view else texts[0]]
        pairs += [(text, name) for text in chosen]
    where = "" if n_gpu_layers == 0 else f", n_gpu_layers={n_gpu_layers}"
    with out.step(f"showing the test image to {len(pairs)} file pair(s) through the projector{where}"):
        t0 = time.perf_counter()
        checks = image_check_many(
            [(view[t].path, projectors[p].path) for t, p in pairs],
            n_gpu_layers=n_gpu_layers,
            threads=job.options.threads,
        )
        timings.took("image_check_s", t0, label)
    files, checked = dict(view), dict(projectors)
    for text_name, projector_name in pairs:
        text, projector = files[text_name], checked[projector_name]
        record = checks[(text.path, projector.path)].as_dict()
        if projector.precision.name == "F16" and text.verification is not None:
            files[text_name] = dataclasses.replace(text, verification={**text.verification, "image": record})
        if projector.verification is None or projector.verification.get("runtime") != record["runtime"]:
            checked[projector_name] = dataclasses.replace(projector, verification={**record, "model": text.path.name})
    return ImageChecks(files, checked)
