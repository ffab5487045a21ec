"""run_job: one job through the pipeline, each step handed what the earlier ones returned.

source (resolve_source) → plan (keys, reusable files, nothing to do?) → convert the base → compare it with the
source → [imatrix] → quantize → read back → [projector] → per runtime: verify, fidelity, image check →
[reference.json] → deliver to every target
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError, ConversionFailed, UsageError
from ..fsutil import outputs_lock, refuse_symlink, remove_stale_staging, sha256_file, staging_dir
from ..manifest import Manifest
from ..output import Output, get_logger
from ..precisions import PrecisionInfo
from ..quant_types import needs_imatrix as overrides_needing
from ..source import count_parameters
from ..toolchain import require_runtime
from .checks import ReferenceRows, measure_fidelity, record_reference, verify_all
from .deliver import Outcome, deliver
from .job import Job, Produced, Target, Timings, layers_of, runtimes
from .make import (
    ConvertedBase,
    Imatrix,
    ImatrixPlan,
    Made,
    base_outtype,
    check_free_space,
    convert_base,
    quantize_all,
    read_back_all,
)
from .projector import ImageChecks, check_images, check_mtp, mmproj_current, plan_projector, produce_mmproj
from .reuse import EarlierRuns, key_for, target_current
from .source_step import finish_source_check, resolve_source, start_source_check

__all__ = ["run_job"]

_log = get_logger("pipeline")


def _attach_logs(targets: tuple[Target, ...]) -> list[logging.Handler]:
    handlers: list[logging.Handler] = []
    root = logging.getLogger("cecai")
    for target in targets:  # every log checked before any is opened
        if target.log_file is not None:
            # A log is appended to in place: a link planted at its name would send every line outside logs/.
            refuse_symlink(
                target.log_file,
                why="refusing to append the log through it; nothing was converted",
                hint=f"remove the link {target.log_file} (this tool never makes one) and re-run",
            )
    for target in targets:
        if target.log_file is None:
            continue
        target.log_file.parent.mkdir(parents=True, exist_ok=True)
        # Appended, so that a no-work re-run does not erase the log of the run that did the work.
        handler = logging.FileHandler(target.log_file, mode="a", encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        handlers.append(handler)
    return handlers


def run_job(job: Job, out: Output) -> list[Manifest]:
    """Run one job and return the manifest written to each target (in target order).

    Raises:
        ConverterError: any failure; nothing partial is left at a final path and staging files are removed.
    """
    if not job.targets:
        raise UsageError("nothing to do: no output folder given")
    if not job.precisions:
        raise ConfigError("no precision requested", hint="e.g. --precision Q4_K_M")
    handlers = _attach_logs(job.targets)
    try:
        return _run(job, out)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC outside the places that already explain it
            raise ConversionFailed(
                f"the disk is full ({exc.filename or 'while writing'}); nothing partial was published",
                hint="free space next to the outputs folder and re-run",
            ) from None
        raise
    finally:
        for handler in handlers:
            logging.getLogger("cecai").removeHandler(handler)
            handler.close()


def _run(job: Job, out: Output) -> list[Manifest]:
    imatrix = ImatrixPlan.from_options(job.options)
    # Hashing (the source on a first run, each new output) overlaps the conversion and quantization steps.
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cecai-hash")
    # What must end with the run however it ends: the source check's worker (a failed conversion or Ctrl-C).
    workers = contextlib.ExitStack()
    try:
        with contextlib.ExitStack() as locks:
            # One run per outputs folder: a second run waits (and then usually finds the work done), and the
            # leftovers removed below are never a live run's. Sorted, so two multi-target runs cannot deadlock.
            for folder in sorted({t.outputs_dir.resolve() for t in job.targets}):
                locks.enter_context(outputs_lock(folder, on_wait=out.info))
            return _execute(job, out, imatrix, pool, workers, time.perf_counter())
    finally:
        # On failure or Ctrl-C nothing waits for hashes of files that are being removed.
        pool.shutdown(wait=False, cancel_futures=True)
        workers.close()


def _execute(
    job: Job,
    out: Output,
    imatrix_plan: ImatrixPlan,
    pool: ThreadPoolExecutor,
    workers: contextlib.ExitStack,
    started: float,
) -> list[Manifest]:
    opts = job.options
    timings = Timings()
    earlier = EarlierRuns(job)
    for target in job.targets:
        for stale in remove_stale_staging(target.outputs_dir):
            _log.info("removed leftovers of an interrupted run: %s", stale)
    _log.info("model %s → %s", job.model, ", ".join(p.name for p in job.precisions))
    resolved = resolve_source(job, out, earlier, pool)
    source, source_record = resolved.source, resolved.record
    # Never a silent text-only file: towers beyond the text model are exported (a projector) or refused by name,
    # unless TEXT_ONLY says to leave them out.
    multimodal = plan_projector(job, source, resolved.converter_dir, out)
    wanted = list(job.precisions)
    # Per-tensor overrides are the quantizer's: a quantized type is then never written by the converter directly.
    base_precision = base_outtype(source, wanted, fidelity=opts.fidelity or bool(opts.tensor_types))
    if opts.tensor_types and all(p.is_float for p in wanted):
        _log.warning(
            "TENSOR_TYPES applies to quantized files only: %s written without the overrides",
            ", ".join(p.name for p in wanted),
        )
    if opts.keep_base and base_precision not in wanted:
        wanted.append(base_precision)
    needs_imatrix = [p.name for p in wanted if p.needs_imatrix]
    if any(not p.is_float for p in wanted):  # an override to IQ1/IQ2 needs one as much as the precision would
        needs_imatrix += [f"TENSOR_TYPES {rule}" for rule in overrides_needing(opts.tensor_types)]
    if needs_imatrix and not imatrix_plan.available:
        raise UsageError(
            f"{', '.join(needs_imatrix)} need(s) an importance matrix: llama.cpp refuses to make them without one",
            hint="give one with --imatrix FILE (IMATRIX: FILE), or compute one with --imatrix auto (IMATRIX: auto; "
            "uses the shipped calibration text, or --calibration-text FILE); or choose a k-quant such as Q2_K / Q3_K_S",
        )
    imatrix_sha = imatrix_plan.identity()

    def keys_for(fingerprint: str) -> dict[str, str]:
        return {p.name: key_for(opts, p, fingerprint, base_precision, imatrix_sha) for p in wanted}

    keys: dict[str, str] = {}
    reused: dict[str, Produced] = {}
    missing: list[PrecisionInfo] = list(wanted)
    if resolved.fingerprint is None:
        keys = keys_for(source_record["fingerprint"])
        missing = []
        for precision in wanted:
            existing = None if opts.force else earlier.find_file(keys[precision.name], precision)
            if existing is not None:
                reused[precision.name] = existing
            else:
                missing.append(precision)
        before = [earlier.manifest(t.outputs_dir) for t in job.targets]
        if not missing and all(
            m is not None
            and target_current(t, m, keys, layers_of(job, t), opts.reference)
            and mmproj_current(job, multimodal, t, m, source_record["fingerprint"])
            for t, m in zip(job.targets, before, strict=True)
        ):
            out.info(
                f"up to date: {job.model_name} ({', '.join(p.name for p in wanted)}); nothing to do (--force redoes)"
            )
            return [m for m in before if m is not None]

    require_runtime()
    anchor = job.targets[0].outputs_dir
    if missing:
        check_free_space(anchor, count_parameters(source), base_precision, missing)
    with staging_dir(anchor) as stage:
        base: ConvertedBase | None = None
        imatrix: Imatrix | None = None
        source_parity: dict[str, Any] | None = None
        made: dict[str, Made] = {}
        if missing:
            source_check = start_source_check(opts, source)  # transformers' side runs while the converter writes
            if source_check is not None:
                workers.callback(source_check.stop)
            base_path = convert_base(job, source, resolved.converter_dir, stage, base_precision, out, timings)
            # its sha256 is computed as one of the run's files when it is one, else here, for fidelity's cache key
            base_sha = pool.submit(sha256_file, base_path) if opts.fidelity and base_precision not in missing else None
            base = ConvertedBase(base_path, base_precision, base_sha)
            if source_check is not None:  # before anything is quantized from a base that may be wrong
                source_parity = finish_source_check(source_check, base_path, out, timings)
            quantized = [p for p in missing if p.name != base_precision.name]
            if quantized and imatrix_plan.available:
                imatrix = imatrix_plan.ensure(job, base_path, stage, out, timings)
            made = quantize_all(
                job, base, missing, imatrix, stage, lambda path: pool.submit(sha256_file, path), out, timings
            )
        if resolved.fingerprint is not None:
            fingerprint, files = resolved.fingerprint.result()
            source_record = {**source_record, "fingerprint": fingerprint, "files": files}
            keys = keys_for(fingerprint)
        produced = read_back_all(reused, made, keys, opts.tensor_types)
        check_mtp(job, source, resolved.converter_dir, multimodal, produced)
        projectors: dict[str, Produced] = {}
        if multimodal is not None and multimodal["projector"]:
            projectors = produce_mmproj(
                job, source, resolved.converter_dir, multimodal, source_record["fingerprint"], stage, earlier, out,
                timings,
            )  # fmt: skip
        # Each runtime among the targets (CPU, GPU offload) loads and measures the shared files itself; everything
        # is checked before anything is delivered, so a failing check leaves every target as it was.
        checked: dict[int, ImageChecks] = {}
        reference_rows: dict[int, ReferenceRows] = {}
        groups = runtimes(job)
        first_runtime = next(iter(groups))
        for layers, targets in groups.items():
            label = "all" if len(groups) == 1 else f"n_gpu_layers={layers}"
            view = produced
            measured_here = opts.fidelity and opts.fidelity_on == "builder" and base is not None
            # The files fidelity measures are verified in the load that measures them (one load per file).
            fused = {n for n, item in view.items() if item.made_here} if measured_here and opts.verify else set()
            view = verify_all(job, view, targets, layers, label, out, timings, fused=fused)
            if measured_here:
                assert base is not None
                rows_here = opts.reference and layers == first_runtime
                measured = measure_fidelity(
                    job, view, base, layers, label, out, timings, verify=fused, rows_here=rows_here
                )
                view = measured.files
                if measured.reference_rows is not None:
                    reference_rows[layers] = measured.reference_rows
            checked[layers] = check_images(job, view, projectors, layers, label, out, timings)
        reference = None
        if opts.reference:
            rows = reference_rows.get(first_runtime)
            reference = record_reference(job, produced, rows, first_runtime, out, timings)
        timings.took("total_s", started)
        outcome = Outcome(
            source_record=source_record, base_precision=base_precision, base=base, imatrix=imatrix,
            multimodal=multimodal, source_parity=source_parity, checked=checked, reference=reference, timings=timings,
        )  # fmt: skip
        manifests = [deliver(job, target, outcome, earlier) for target in job.targets]
    return manifests
