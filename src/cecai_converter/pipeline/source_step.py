"""The source: checked and fingerprinted before any work (:func:`resolve_source`), and compared with the base the
converter made from it (source_parity: :func:`start_source_check`, :func:`finish_source_check`)."""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SourceMismatch
from ..output import Output
from ..precisions import PrecisionInfo
from ..request_options import Options
from ..source import ModelSource, check_model_dir, fetch_from_hub, fingerprint_files
from ..source_card import source_card_field
from ..source_parity import SourceCheck, not_checked
from ..toolchain import ensure_converter
from .job import Job, Timings
from .reuse import EarlierRuns, key_for

__all__ = ["ResolvedSource", "finish_source_check", "parity_record", "resolve_source", "start_source_check"]

_PARITY_OFF = "turned off (--no-source-check, SOURCE_CHECK: false or CECAI_SOURCE_CHECK=0)"


@dataclass(frozen=True)
class ResolvedSource:
    """The checked source, its manifest record and the converter that reads it."""

    source: ModelSource
    #: the manifest's ``source`` (its ``fingerprint`` and ``files`` added by the run when ``fingerprint`` is pending)
    record: dict[str, Any]
    #: the fingerprint, computed in the background while the conversion runs, when no manifest has seen these
    #: files before (so nothing can be reused and the fingerprint is not needed to plan); None: in ``record``
    fingerprint: Future[tuple[str, list[dict[str, Any]]]] | None
    #: the pinned llama.cpp's converter folder (convert_hf_to_gguf.py)
    converter_dir: Path


def _hub_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cecai-converter" / "hub"


def resolve_source(job: Job, out: Output, earlier: EarlierRuns, pool: ThreadPoolExecutor) -> ResolvedSource:
    """Check the source and fingerprint it (in the background on ``pool`` when no earlier run has seen it)."""
    converter_dir = ensure_converter()
    allow_pickle = job.options.allow_pickle
    if job.hub:
        with out.step(f"downloading {job.model}" + (f"@{job.revision}" if job.revision else "")):
            local, resolved = fetch_from_hub(job.model, job.revision, _hub_cache())
        source = check_model_dir(local, converter_dir, allow_pickle=allow_pickle)
        fingerprint, _ = fingerprint_files(local)
        record: dict[str, Any] = {"kind": "hub", "repo_id": job.model, "revision": resolved}
        record.update(fingerprint=fingerprint, **source_card_field(local))
        source = dataclasses.replace(source, repo_id=job.model, revision=resolved)
        return ResolvedSource(source, record, None, converter_dir)
    path = Path(job.model).resolve()
    source = check_model_dir(path, converter_dir, allow_pickle=allow_pickle)
    previous: dict[str, Any] | None = None
    for folder in earlier.folders():
        old = earlier.manifest(folder)
        if old and old.source_path == str(path):
            previous = {f["path"]: f for f in old.source_files}
            break
    record = {"kind": "local", "path": str(path), **source_card_field(path)}
    if previous is None:
        return ResolvedSource(source, record, pool.submit(fingerprint_files, path), converter_dir)
    fingerprint, files = fingerprint_files(path, previous)
    return ResolvedSource(source, {**record, "fingerprint": fingerprint, "files": files}, None, converter_dir)


def start_source_check(options: Options, source: ModelSource) -> SourceCheck | None:
    """The source side of the comparison with the source model, started in the background (None when it is off)."""
    if not options.source_check:
        return None
    check = SourceCheck(
        source.path, trust_remote_code=options.trust_remote_code, eval_text=options.eval_text,
        limits=options.thresholds.get("source"), threads=options.threads,
    )  # fmt: skip
    return check.start()


def finish_source_check(check: SourceCheck, base_path: Path, out: Output, timings: Timings) -> dict[str, Any]:
    """Compare the freshly converted base with its source model; a difference fails the run (nothing published).

    Returns the manifest's ``source_parity`` of this run (source_parity.SourceParity.to_dict).
    """
    with out.step("comparing the base with the source model (tokenizer, chat template, logits)"):
        t0 = time.perf_counter()
        try:
            record = check.finish(base_path)
        finally:
            check.stop()
        # the time this step added to the run; the source side's own time, mostly spent while the converter ran,
        # is in the record's timings
        timings.took("source_check_s", t0)
    parity = record.to_dict()
    for part in ("tokenizer", "logits"):
        reason = (getattr(record, part) or {}).get("reason")
        if reason:
            out.warning(f"source check: {part} not compared: {reason}")
    if not record.passed:
        raise SourceMismatch(
            record.message,
            hint="nothing was published; the converter (or the source folder) is at fault: report it with the "
            "model, or, if the difference is expected, --no-source-check (SOURCE_CHECK: false) converts without "
            "the check and the manifest says so",
        )
    return parity


def parity_record(
    options: Options,
    checked: dict[str, Any] | None,
    earlier: EarlierRuns,
    source_record: dict[str, Any],
    base: PrecisionInfo,
) -> dict[str, Any]:
    """The manifest's ``source_parity``: this run's comparison (``checked``), else the one recorded for the same
    base bytes by an earlier run (a re-run that reused every file has no base to compare), else why there is none."""
    key = key_for(options, base, str(source_record.get("fingerprint")), base, None)
    if checked is not None:
        return {**checked, "base_inputs_key": key}
    if not options.source_check:
        return not_checked(_PARITY_OFF).to_dict()
    reused = earlier.source_parity(key)
    if reused is not None:
        return reused
    return not_checked(
        "every file was reused from an earlier run and no record of a source check of this base was found; "
        "--force converts and checks again"
    ).to_dict()
