"""The conversion pipeline: convert once, quantize each precision once, verify, deliver to every target.

    resolve source → fingerprint → plan (what is already current) → convert base → [imatrix] → quantize
    → verify → [fidelity] → deliver (install each file atomically) → manifest per target

A *target* is one outputs folder (``outputs/<PAIR>`` for a Converter folder, ``--outdir`` otherwise). GGUF bytes
do not depend on the pair, so several targets share one base and one file per precision; a pair's own work is
its verification. Files already made from the same inputs, in this target or a sibling pair's folder, are reused
instead of remade.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agreement import N_POSITIONS, REFERENCE_NAME, make_reference
from .card import source_card_field
from .convert import run_converter
from .errors import ConfigError, ConversionFailed, UsageError, VerificationFailed
from .fsutil import atomic_write_json, install_file, outputs_lock, remove_stale_staging, sha256_file, staging_dir
from .manifest import Manifest, file_is_current, inputs_key, read_manifest, write_manifest
from .output import Output, get_logger
from .pairs import PairInfo
from .precisions import PRECISIONS, PrecisionInfo
from .quant_types import bits_per_weight, quantization_record, shape_fallbacks
from .source import ModelSource, check_model_dir, count_parameters, fetch_from_hub, fingerprint_files, source_dtype
from .toolchain import ensure_converter, require_runtime, toolchain_info
from .tools import runtime_name
from .verify import load_check_many, read_back

__all__ = ["Job", "Options", "Target", "run_job"]

_log = get_logger("pipeline")
_FACT_KEYS = ("tensor_count", "architecture", "file_type", "n_params")


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
class Options:
    """How to convert; every field has a CLI flag and most have a YAML key."""

    force: bool = False
    keep_base: bool = False
    threads: int | None = None
    allow_pickle: bool = False
    imatrix: Path | None = None
    #: compute an importance matrix with llama-imatrix (on calibration_text, else the shipped text)
    compute_imatrix: bool = False
    calibration_text: Path | None = None
    fidelity: bool = False
    #: where fidelity is measured: ``builder`` (here) or ``check`` (the check jobs; the base goes to the outputs)
    fidelity_on: str = "builder"
    eval_text: Path | None = None
    #: the error bar fidelity stops at (fidelity.Budget.target), and ``auto`` (stop there) or ``all`` (whole text)
    fidelity_target: float = 0.1
    fidelity_tokens: str = "auto"
    thresholds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    verify: bool = True
    n_gpu_layers: int = 0
    #: write reference.json (what this runtime predicts for each file) so other runtimes can be checked against it
    reference: bool = False
    #: per-tensor type overrides for the quantizer, ``PATTERN=TYPE`` (TENSOR_TYPES; quant_types.parse_rule)
    tensor_types: tuple[str, ...] = ()
    #: publish the text model alone when the model has towers that cannot be exported (recorded; default: refuse)
    text_only: bool = False
    #: compare the base with the source model (source_parity.py; the table's default is on, as for fidelity)
    source_check: bool = False
    #: let the source check run the repository's own model code (auto_map), recorded
    trust_remote_code: bool = False


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
    options: Options = Options()
    hub: bool = False
    revision: str | None = None
    trained: bool | None = None


def _hub_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cecai-converter" / "hub"


def _tensor_progress(out: Output, precision_name: str, done: int, total: int) -> None:
    out.progress(f"    {precision_name}: tensor {done}/{total}")


def _file_name(model_name: str, precision: PrecisionInfo) -> str:
    return f"{model_name}.{precision.suffix}.gguf"


@dataclass
class _Produced:
    """A file made (or found) in this run, ready to deliver."""

    path: Path
    precision: PrecisionInfo
    key: str
    sha256: str
    facts: dict[str, Any]
    verification: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    made_here: bool = True
    origin: Path | None = None
    sha_future: Future[str] | None = None
    #: the quantizer's fallbacks (None: the converter wrote the file); the manifest's ``quantization`` record
    fallbacks: list[dict[str, str]] | None = None
    quantization: dict[str, Any] | None = None


class _Run:
    """The state of one :func:`run_job` call."""

    def __init__(self, job: Job, out: Output) -> None:
        self.job = job
        self.out = out
        self.opts = job.options
        self.timings: dict[str, Any] = {"quantize_s": {}, "verify_s": {}, "fidelity_s": {}}
        self.produced: dict[str, _Produced] = {}
        self.base_path: Path | None = None
        self.converter_dir: Path | None = None
        self.imatrix = _ImatrixPlan.from_options(job.options)
        # Hashing (the source on a first run, each new output) overlaps the conversion and quantization steps.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cecai-hash")
        self._previous: dict[Path, Manifest | None] = {}
        #: towers beyond the text model, as the manifest records them (multimodal.plan_towers); None: a text model
        self.multimodal: dict[str, Any] | None = None
        #: the projector files by precision (F16, Q8_0), and per runtime (n_gpu_layers) their checked copies
        self.mmproj: dict[str, _Produced] = {}
        #: the base's comparison with its source (source_parity.SourceParity.to_dict), once the base is converted
        self.source_parity: dict[str, Any] | None = None
        #: its source side, started before the converter so that the two overlap (stopped when the run ends)
        self.pending_check: Any = None
        self.mmproj_checked: dict[int, dict[str, _Produced]] = {}
        #: the base's SHA-256 (fidelity's cache key) when the base is no file of the run (hashed in the background)
        self.base_sha: Future[str] | None = None
        #: per runtime (n_gpu_layers): the reference tokens and each measured file's reference.json rows, taken from
        #: the evaluation that measured its fidelity (one load of the file for both)
        self.reference_rows: dict[int, tuple[list[int], dict[str, dict[str, Any]]]] = {}

    def previous(self, folder: Path) -> Manifest | None:
        """The manifest an earlier run left in ``folder``: read once per run (the targets' folders are locked by
        then), then asked for every lookup (source records, reusable files, up-to-date checks)."""
        if folder not in self._previous:
            self._previous[folder] = read_manifest(folder)
        return self._previous[folder]

    # -- source -----------------------------------------------------------------------------------------------
    def resolve_source(self) -> tuple[ModelSource, dict[str, Any], Future[tuple[str, list[dict[str, Any]]]] | None]:
        """Check the source and fingerprint it.

        Returns the source, its manifest record and, when no manifest has seen these files before (so nothing can
        be reused and the fingerprint is not needed to plan), a future of the fingerprint computed in the
        background while the conversion runs.
        """
        job = self.job
        self.converter_dir = ensure_converter()
        if job.hub:
            with self.out.step(f"downloading {job.model}" + (f"@{job.revision}" if job.revision else "")):
                local, resolved = fetch_from_hub(job.model, job.revision, _hub_cache())
            source = check_model_dir(local, self.converter_dir, allow_pickle=self.opts.allow_pickle)
            fingerprint, _ = fingerprint_files(local)
            record: dict[str, Any] = {"kind": "hub", "repo_id": job.model, "revision": resolved}
            record.update(fingerprint=fingerprint, **source_card_field(local))
            return dataclasses.replace(source, repo_id=job.model, revision=resolved), record, None
        path = Path(job.model).resolve()
        source = check_model_dir(path, self.converter_dir, allow_pickle=self.opts.allow_pickle)
        previous: dict[str, Any] | None = None
        for folder in self.related_folders():
            old = self.previous(folder)
            if old and old.source_path == str(path):
                previous = {f["path"]: f for f in old.source_files}
                break
        record = {"kind": "local", "path": str(path), **source_card_field(path)}
        if previous is None:
            return source, record, self.pool.submit(fingerprint_files, path)
        fingerprint, files = fingerprint_files(path, previous)
        return source, {**record, "fingerprint": fingerprint, "files": files}, None

    def related_folders(self) -> list[Path]:
        """The targets' folders, then their sibling pair folders (a file made for one pair serves every pair)."""
        folders: list[Path] = [t.outputs_dir for t in self.job.targets]
        for target in self.job.targets:
            if target.pair is not None and target.outputs_dir.parent.is_dir():
                folders += [p for p in sorted(target.outputs_dir.parent.iterdir()) if p.is_dir()]
        return list(dict.fromkeys(folders))

    # -- planning ---------------------------------------------------------------------------------------------
    def key_for(self, precision: PrecisionInfo, fingerprint: str, base: PrecisionInfo, imatrix_sha: str | None) -> str:
        """What the bytes of ``precision`` depend on: the source, the toolchain, and how the file is made (written
        by the converter as the base, or quantized from a base of some type with some importance matrix)."""
        made = "converter" if precision.name == base.name else f"quantized-from-{base.name}"
        # Overrides only where the quantizer applies them, and only when given: keys of files made without any
        # stay what they were, so an upgrade does not remake them.
        quantized = made != "converter"
        overrides = {"tensor_types": list(self.opts.tensor_types)} if self.opts.tensor_types and quantized else {}
        return inputs_key(
            source=fingerprint,
            precision=precision.name,
            toolchain=toolchain_info().as_manifest(),
            made=made,
            imatrix=imatrix_sha if made != "converter" else None,
            **overrides,
        )

    def find_existing(self, key: str, precision: PrecisionInfo) -> _Produced | None:
        """A current file for ``key`` in any target or sibling pair folder (reused instead of remade)."""
        for folder in self.related_folders():
            manifest = self.previous(folder)
            for entry in manifest.files if manifest else []:
                if entry.precision == precision.name and file_is_current(entry, folder, key):
                    return _Produced(
                        path=folder / entry.name,
                        precision=precision,
                        key=key,
                        sha256=entry.sha256,
                        facts={k: v for k, v in entry.to_dict().items() if k in _FACT_KEYS},
                        verification=entry.verification,
                        fidelity=entry.fidelity,
                        made_here=False,
                        origin=folder,
                        quantization=entry.quantization,
                    )
        return None


def _base_outtype(source: ModelSource, wanted: Sequence[PrecisionInfo], *, fidelity: bool) -> PrecisionInfo:
    """The base file's type: lossless (the checkpoint's own float type), or the single requested type when the
    converter writes it directly, so that one conversion is the whole job. Not when fidelity is measured and that
    type is quantized: its numbers need a lossless reference."""
    only = wanted[0] if len(wanted) == 1 else None
    direct = only is not None and only.converter_outtype is not None and not only.name.startswith("TQ")
    if only is not None and direct and (only.is_float or not fidelity):
        return only
    return PRECISIONS[source_dtype(source).upper()]


def _attach_logs(targets: Sequence[Target]) -> list[logging.Handler]:
    from .fsutil import refuse_symlink

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
    run = _Run(job, out)
    try:
        with contextlib.ExitStack() as locks:
            # One run per outputs folder: a second run waits (and then usually finds the work done), and the
            # leftovers removed below are never a live run's. Sorted, so two multi-target runs cannot deadlock.
            for folder in sorted({t.outputs_dir.resolve() for t in job.targets}):
                locks.enter_context(outputs_lock(folder, on_wait=out.info))
            return _execute(run, time.perf_counter())
    finally:
        # On failure or Ctrl-C nothing waits for hashes of files that are being removed.
        run.pool.shutdown(wait=False, cancel_futures=True)
        if run.pending_check is not None:  # a failed conversion or Ctrl-C: the source side's worker ends too
            run.pending_check.stop()


def _execute(run: _Run, started: float) -> list[Manifest]:
    job, out, opts = run.job, run.out, run.opts
    for target in job.targets:
        for stale in remove_stale_staging(target.outputs_dir):
            _log.info("removed leftovers of an interrupted run: %s", stale)
    _log.info("model %s → %s", job.model, ", ".join(p.name for p in job.precisions))
    source, source_record, pending_fingerprint = run.resolve_source()
    # Never a silent text-only file: towers beyond the text model are exported (a projector) or refused by name,
    # unless TEXT_ONLY says to leave them out.
    run.multimodal = _plan_towers(run, source)
    wanted = list(job.precisions)
    # Per-tensor overrides are the quantizer's: a quantized type is then never written by the converter directly.
    base_precision = _base_outtype(source, wanted, fidelity=opts.fidelity or bool(opts.tensor_types))
    if opts.tensor_types and all(p.is_float for p in wanted):
        _log.warning(
            "TENSOR_TYPES applies to quantized files only: %s written without the overrides",
            ", ".join(p.name for p in wanted),
        )
    if opts.keep_base and base_precision not in wanted:
        wanted.append(base_precision)
    needs_imatrix = [p.name for p in wanted if p.needs_imatrix]
    if any(not p.is_float for p in wanted):  # an override to IQ1/IQ2 needs one as much as the precision would
        from .quant_types import needs_imatrix as overrides_needing

        needs_imatrix += [f"TENSOR_TYPES {rule}" for rule in overrides_needing(opts.tensor_types)]
    if needs_imatrix and not run.imatrix.available:
        raise UsageError(
            f"{', '.join(needs_imatrix)} need(s) an importance matrix: llama.cpp refuses to make them without one",
            hint="give one with --imatrix FILE (IMATRIX: FILE), or compute one with --imatrix auto (IMATRIX: auto; "
            "uses the shipped calibration text, or --calibration-text FILE); or choose a k-quant such as Q2_K / Q3_K_S",
        )
    imatrix_sha = run.imatrix.identity()

    def keys_for(fingerprint: str) -> dict[str, str]:
        return {p.name: run.key_for(p, fingerprint, base_precision, imatrix_sha) for p in wanted}

    keys: dict[str, str] = {}
    missing: list[PrecisionInfo] = list(wanted)
    if pending_fingerprint is None:
        keys = keys_for(source_record["fingerprint"])
        missing = []
        for precision in wanted:
            existing = None if opts.force else run.find_existing(keys[precision.name], precision)
            if existing is not None:
                run.produced[precision.name] = existing
            else:
                missing.append(precision)
        earlier = [run.previous(t.outputs_dir) for t in job.targets]
        if not missing and all(
            m is not None
            and _target_current(t, m, keys, _layers_of(job, t), opts.reference)
            and _mmproj_current(run, t, m, source_record["fingerprint"])
            for t, m in zip(job.targets, earlier, strict=True)
        ):
            out.info(
                f"up to date: {job.model_name} ({', '.join(p.name for p in wanted)}); nothing to do (--force redoes)"
            )
            return [m for m in earlier if m is not None]

    require_runtime()
    anchor = job.targets[0].outputs_dir
    if missing:
        _check_free_space(anchor, count_parameters(source), base_precision, missing)
    with staging_dir(anchor) as stage:
        if missing:
            _produce(run, source, stage, missing, base_precision)
        if pending_fingerprint is not None:
            fingerprint, files = pending_fingerprint.result()
            source_record.update(fingerprint=fingerprint, files=files)
            keys = keys_for(fingerprint)
        for name, item in run.produced.items():
            item.key = item.key or keys[name]
        _read_back_all(run)
        _check_mtp(run, source)
        if run.multimodal is not None and run.multimodal["projector"]:
            _produce_mmproj(run, source, stage, source_record["fingerprint"])
        # Each runtime among the targets (CPU, GPU offload) loads and measures the shared files itself; everything
        # is checked before anything is delivered, so a failing check leaves every target as it was.
        checked: dict[int, dict[str, _Produced]] = {}
        runtimes = _runtimes(job)
        for layers, targets in runtimes.items():
            label = "all" if len(runtimes) == 1 else f"n_gpu_layers={layers}"
            view = {name: dataclasses.replace(item) for name, item in run.produced.items()}
            measured_here = opts.fidelity and opts.fidelity_on == "builder" and run.base_path is not None
            # The files fidelity measures are verified in the load that measures them (one load per file).
            fused = {n for n, item in view.items() if item.made_here} if measured_here and opts.verify else set()
            _verify_all(run, view, targets, layers, label, fused=fused)
            if measured_here:
                _measure_fidelity(run, view, layers, label, verify=fused)
            checked[layers] = view
            run.mmproj_checked[layers] = _check_images(run, view, layers, label)
        reference = _make_reference(run, next(iter(runtimes))) if opts.reference else None
        run.timings["total_s"] = round(time.perf_counter() - started, 3)
        manifests = [
            _deliver(run, target, checked[_layers_of(job, target)], source_record, base_precision, reference)
            for target in job.targets
        ]
    return manifests


def _make_reference(run: _Run, n_gpu_layers: int) -> dict[str, Any]:
    """What the builder's runtime predicts for every file of this run, for other runtimes to be checked against."""
    files = {_file_name(run.job.model_name, item.precision): item for item in run.produced.values()}
    tokens, rows = run.reference_rows.get(n_gpu_layers, ([], {}))
    # Files whose fidelity was measured have their rows from that evaluation; the others (reused, or fidelity off)
    # are loaded here, on the same tokens.
    rest = {name: item.path for name, item in files.items() if name not in rows}
    t0 = time.perf_counter()
    if rest:
        with run.out.step(f"recording this runtime's predictions for {len(rest)} file(s) (reference.json)"):
            reference = make_reference(
                rest, n_gpu_layers=n_gpu_layers, threads=run.opts.threads, tokens=list(tokens) if rows else None
            )
    else:
        reference = make_reference({}, n_gpu_layers=n_gpu_layers)
    if rows:
        from .agreement import runtime_facts

        reference.update(tokens=list(tokens), runtime=runtime_facts(n_gpu_layers))
        reference["files"] = {name: {**(rows.get(name) or reference["files"][name])} for name in files}
    run.timings["reference_s"] = round(time.perf_counter() - t0, 3)
    for name, item in files.items():
        reference["files"][name]["sha256"] = item.sha256
    return reference


def _layers_of(job: Job, target: Target) -> int:
    return job.options.n_gpu_layers if target.n_gpu_layers is None else target.n_gpu_layers


def _runtimes(job: Job) -> dict[int, list[Target]]:
    """The job's targets grouped by the layers their runtime offloads, in target order."""
    groups: dict[int, list[Target]] = {}
    for target in job.targets:
        groups.setdefault(_layers_of(job, target), []).append(target)
    return groups


def _check_free_space(folder: Path, n_params: int, base: PrecisionInfo, missing: Sequence[PrecisionInfo]) -> None:
    """Refuse to start a job that cannot fit: the base plus every new file, estimated from bits per weight."""
    if n_params <= 0:
        return
    needed = n_params * (base.bpw + sum(p.bpw for p in missing if p.name != base.name)) / 8
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConversionFailed(
            f"not enough disk space in {folder}: this job needs about {needed / 1e9:.2f} GB "
            f"(the {base.name} base and {len(missing)} file(s)), {free / 1e9:.2f} GB are free",
            hint="free space there or choose another outputs folder, then re-run",
        )


@dataclass
class _ImatrixPlan:
    """Where this run's importance matrix comes from: a given file, llama-imatrix on a calibration text, or none.

    A given or computed matrix is used for every quantized type (it helps k-quants too); types that need one
    cannot be made without it.
    """

    given: Path | None = None
    compute: bool = False
    calibration_text: Path | None = None
    path: Path | None = None
    record: dict[str, Any] | None = None

    @classmethod
    def from_options(cls, opts: Options) -> _ImatrixPlan:
        if opts.imatrix is not None and not opts.imatrix.is_file():
            raise UsageError(f"importance matrix not found: {opts.imatrix}", hint="or use --imatrix auto")
        if opts.calibration_text is not None and not opts.calibration_text.is_file():
            raise UsageError(f"calibration text not found: {opts.calibration_text}")
        compute = opts.imatrix is None and (opts.compute_imatrix or opts.calibration_text is not None)
        return cls(given=opts.imatrix, compute=compute, calibration_text=opts.calibration_text, path=opts.imatrix)

    @property
    def available(self) -> bool:
        return self.given is not None or self.compute

    def identity(self) -> str | None:
        """What quantized bytes depend on: the given file's hash, or the calibration text's (computed matrix)."""
        if self.given is not None:
            return "given:" + sha256_file(self.given)
        if self.compute:
            from .imatrix import default_calibration_text

            return "computed:" + sha256_file(self.calibration_text or default_calibration_text())
        return None

    def ensure(self, run: _Run, base: Path, stage: Path) -> Path | None:
        """The matrix file, computing it from ``base`` on first use; records it for the manifest."""
        from . import imatrix as imatrix_mod

        if self.path is None and self.compute:
            text = self.calibration_text or imatrix_mod.default_calibration_text()
            with run.out.step(f"computing an importance matrix with llama-imatrix on {text.name}"):
                t0 = time.perf_counter()
                # Named as it is published: llama.cpp records the name in every file quantized with it.
                out_path = stage / f"{run.job.model_name}.imatrix.gguf"
                self.path = imatrix_mod.compute(base, self.calibration_text, out_path, n_threads=run.opts.threads)
                run.timings["imatrix_s"] = round(time.perf_counter() - t0, 3)
            self.record = {**imatrix_mod.load_for_quantize(self.path).describe(), "source": "computed",
                           "calibration_text": text.name, "calibration_text_sha256": sha256_file(text)}  # fmt: skip
            # Delivered next to the GGUF files (see _deliver), so it can be reused as IMATRIX: FILE.
            self.record["file"] = f"{run.job.model_name}.imatrix.gguf"
        elif self.path is not None and self.record is None:
            self.record = {**imatrix_mod.load_for_quantize(self.path).describe(), "source": "given"}
        return self.path


def _target_current(
    target: Target, manifest: Manifest, keys: Mapping[str, str], n_gpu_layers: int, need_reference: bool
) -> bool:
    """Whether ``manifest`` (the target's, from an earlier run) already lists every wanted file, made from ``keys``
    and verified with ``n_gpu_layers``."""
    if need_reference and not _reference_current(target.outputs_dir, {e.name: e.sha256 for e in manifest.files}):
        return False
    if manifest.n_gpu_layers != n_gpu_layers:
        return False  # verified and measured for another runtime setting: check again (the files are reused)
    entries = manifest.by_precision()
    return all(
        name in entries and file_is_current(entries[name], target.outputs_dir, key)
        for name, key in keys.items()
        if target.wants(name)
    )


def _reference_current(folder: Path, files: Mapping[str, str]) -> bool:
    """Whether ``folder`` has a reference for exactly the bytes of ``files`` (name → sha256, as a manifest lists)."""
    from .agreement import read_reference

    try:
        reference = read_reference(folder / REFERENCE_NAME)
    except ConfigError:
        return False
    entries = reference["files"]
    return all((entries.get(name) or {}).get("sha256") == sha256 for name, sha256 in files.items())


def _produce(
    run: _Run,
    source: ModelSource,
    stage: Path,
    missing: list[PrecisionInfo],
    base_precision: PrecisionInfo,
) -> None:
    job, out, opts = run.job, run.out, run.opts
    assert run.converter_dir is not None
    base_path = stage / _file_name(job.model_name, base_precision)
    metadata = {}
    if source.repo_id:
        metadata = {"source_url": f"https://huggingface.co/{source.repo_id}", "source_hf_repo": source.repo_id}
    run.pending_check = _start_source_check(run, source)  # transformers' side runs while the converter writes
    with out.step(f"converting {source.architecture} to a {base_precision.name} base GGUF"):
        t0 = time.perf_counter()
        run_converter(
            run.converter_dir,
            source,
            base_path,
            base_precision.converter_outtype or base_precision.suffix,
            model_name=job.model_name,
            metadata=metadata or None,
            on_tensor=lambda n: out.progress(f"    converting tensor {n}"),
        )
        run.timings["convert_s"] = round(time.perf_counter() - t0, 3)
    run.base_path = base_path
    if opts.fidelity and base_precision not in missing:  # else its sha256 is computed as one of the run's files
        run.base_sha = run.pool.submit(sha256_file, base_path)
    _check_source(run, base_path)  # before anything is quantized from a base that may be wrong
    quantized = [p for p in missing if p.name != base_precision.name]
    imatrix_path = run.imatrix.ensure(run, base_path, stage) if quantized and run.imatrix.available else None
    for precision in missing:
        dest = stage / _file_name(job.model_name, precision)
        fallbacks = None
        if precision.name == base_precision.name:
            produced_path = base_path
        else:
            with out.step(f"quantizing to {precision.name}"):
                t0 = time.perf_counter()
                from .quantize import quantize

                fallbacks = quantize(
                    base_path,
                    dest,
                    precision,
                    threads=opts.threads,
                    imatrix=imatrix_path,
                    on_progress=functools.partial(_tensor_progress, out, precision.name),
                    tensor_types=opts.tensor_types,
                )
                run.timings["quantize_s"][precision.name] = round(time.perf_counter() - t0, 3)
            if fallbacks:  # said where the user looks, not only in the manifest
                shown = ", ".join(f"{f['tensor']} {f['asked']}→{f['written']}" for f in fallbacks[:3])
                more = f" and {len(fallbacks) - 3} more" if len(fallbacks) > 3 else ""
                _log.warning(
                    f"{precision.name}: {len(fallbacks)} tensor(s) written in another type than the recipe asks "
                    f"(rows not a multiple of the block size): {shown}{more}; see quantization.fallbacks in the "
                    "manifest"
                )
            produced_path = dest
        run.produced[precision.name] = _Produced(
            path=produced_path,
            precision=precision,
            key="",  # known once the source fingerprint is
            sha256="",
            facts={},
            sha_future=run.pool.submit(sha256_file, produced_path),
            fallbacks=fallbacks,
        )


def _ggml_type(precision: PrecisionInfo) -> int:
    """The tensor type a converter-written precision stores its weights in (F32 for float types: no fallback)."""
    from .quant_types import TYPE_IDS

    return TYPE_IDS.get(precision.name, 0) if not precision.is_float else 0


def _read_back_all(run: _Run) -> None:
    """Read back every file's header (its facts do not depend on the runtime) and collect its SHA-256."""
    for item in run.produced.values():
        facts = read_back(item.path, item.precision)
        item.facts = {k: getattr(facts, k) for k in _FACT_KEYS}
        if item.made_here:
            # What llama.cpp really wrote: the quantizer's own fallbacks, or (a file the converter wrote at a
            # quantized type) the weight matrices its blocks could not hold.
            quantized = item.fallbacks is not None
            item.quantization = quantization_record(
                facts.tensors,
                fallbacks=item.fallbacks
                if item.fallbacks is not None
                else shape_fallbacks(facts.tensors, _ggml_type(item.precision)),
                overrides=run.opts.tensor_types if quantized else (),
            )
        if item.sha_future is not None:
            item.sha256 = item.sha_future.result()
            item.sha_future = None


def _verify_all(
    run: _Run,
    view: dict[str, _Produced],
    targets: Sequence[Target],
    n_gpu_layers: int,
    label: str,
    *,
    fused: Collection[str] = (),
) -> None:
    """Load every file once on the runtime of ``targets`` and generate from it (all in one worker process).

    A file reused from one of these very targets keeps its earlier verification if it was made on the same
    runtime; one from a sibling pair's folder is loaded again here, since a pair's own work is verifying the file
    on its runtime. The files in ``fused`` (precision names) are left to fidelity, which verifies them in the load
    that measures them (:func:`_measure_fidelity`).
    """
    own_folders = {t.outputs_dir for t in targets}
    to_load: list[_Produced] = []
    for name, item in view.items():
        if name in fused:
            continue
        kept = (
            item.verification is not None
            and not item.made_here
            and item.origin in own_folders
            and item.verification.get("runtime") == runtime_name(n_gpu_layers)
        )
        if run.opts.verify and not kept:
            to_load.append(item)
    if not to_load:
        return
    names = ", ".join(item.path.name for item in to_load)
    where = "" if n_gpu_layers == 0 else f", n_gpu_layers={n_gpu_layers}"
    with run.out.step(f"verifying {names} (load + generate{where})"):
        t0 = time.perf_counter()
        checks = load_check_many([item.path for item in to_load], n_gpu_layers=n_gpu_layers, threads=run.opts.threads)
        run.timings["verify_s"][label] = round(time.perf_counter() - t0, 3)
    for item in to_load:
        item.verification = checks[item.path].as_dict()


def _measure_fidelity(
    run: _Run, view: dict[str, _Produced], n_gpu_layers: int, label: str, *, verify: Collection[str] = ()
) -> None:
    """Measure the files made in this run against the base, on one runtime. Files reused from an earlier run keep
    the numbers recorded then (with the device they were measured on): the base they need is gone."""
    from . import fidelity

    assert run.base_path is not None
    todo = {name: item.path for name, item in view.items() if item.made_here}
    if not todo:
        return
    where = "" if n_gpu_layers == 0 else f", n_gpu_layers={n_gpu_layers}"
    budget = None if run.opts.fidelity_tokens == "all" else fidelity.Budget(target=run.opts.fidelity_target)
    # reference.json's rows come from this evaluation when this is the runtime the reference is made on
    rows_here = run.opts.reference and n_gpu_layers == next(iter(_runtimes(run.job)))
    base_sha = next((i.sha256 for i in run.produced.values() if i.path == run.base_path and i.sha256), None)
    if base_sha is None and run.base_sha is not None:
        base_sha = run.base_sha.result()
    with run.out.step(f"measuring fidelity against the base ({', '.join(todo)}{where})"):
        t0 = time.perf_counter()
        measured = fidelity.measure_run(
            run.base_path, todo, eval_text=run.opts.eval_text, n_threads=run.opts.threads, n_gpu_layers=n_gpu_layers,
            budget=budget, cache_root=fidelity.default_cache_root(), base_sha256=base_sha,
            reference_positions=N_POSITIONS if rows_here else 0, verify=verify,
        )  # fmt: skip
        run.timings["fidelity_s"][label] = round(time.perf_counter() - t0, 3)
    results = measured.results
    for name in verify:  # what verify.load_check_many checks, for the files verified in fidelity's load
        check = measured.verifications.get(name)
        if check is None:
            raise VerificationFailed(f"the fidelity worker reported no verification for {view[name].path.name}")
        if not check.get("generated_tokens"):
            raise VerificationFailed(f"{view[name].path.name} loaded but generated no tokens")
        view[name].verification = check
    # Observable without timing: a re-run on the same base evaluates 0 of its positions (fidelity's cache).
    run.timings.setdefault("fidelity_base_tokens", {})[label] = measured.base_tokens_evaluated
    _log.info(
        "fidelity: base evaluated on %d new position(s)%s; %s",
        measured.base_tokens_evaluated,
        " (cached from an earlier run)" if measured.base_tokens_evaluated == 0 else "",
        ", ".join(f"{name}: {r['n_tokens']} positions" for name, r in results.items()),
    )
    if rows_here and measured.reference_rows:
        run.reference_rows[n_gpu_layers] = (
            measured.reference_tokens,
            {_file_name(run.job.model_name, view[name].precision): r for name, r in measured.reference_rows.items()},
        )
    for name, metrics in results.items():
        view[name].fidelity = metrics
    if run.opts.thresholds:
        violations = fidelity.check_thresholds(results, run.opts.thresholds)
        if violations:
            raise ConversionFailed(
                "fidelity thresholds exceeded: " + "; ".join(violations),
                hint="nothing was published; relax THRESHOLDS or choose a larger precision",
            )


_PARITY_OFF = "turned off (--no-source-check, SOURCE_CHECK: false or CECAI_SOURCE_CHECK=0)"


def _start_source_check(run: _Run, source: ModelSource) -> Any:
    """The source side of the comparison with the source model, started in the background (None when it is off)."""
    from .source_parity import SourceCheck

    if not run.opts.source_check:
        return None
    check = SourceCheck(
        source.path, trust_remote_code=run.opts.trust_remote_code, eval_text=run.opts.eval_text,
        limits=run.opts.thresholds.get("source"), threads=run.opts.threads,
    )  # fmt: skip
    return check.start()


def _check_source(run: _Run, base_path: Path) -> None:
    """Compare the freshly converted base with its source model; a difference fails the run (nothing published)."""
    from .errors import SourceMismatch

    check = run.pending_check
    if check is None:
        return
    with run.out.step("comparing the base with the source model (tokenizer, chat template, logits)"):
        t0 = time.perf_counter()
        try:
            record = check.finish(base_path)
        finally:
            check.stop()
        # the time this step added to the run; the source side's own time, mostly spent while the converter ran,
        # is in the record's timings
        run.timings["source_check_s"] = round(time.perf_counter() - t0, 3)
    run.source_parity = record.to_dict()
    for part in ("tokenizer", "logits"):
        reason = (getattr(record, part) or {}).get("reason")
        if reason:
            run.out.warning(f"source check: {part} not compared: {reason}")
    if not record.passed:
        raise SourceMismatch(
            record.message,
            hint="nothing was published; the converter (or the source folder) is at fault: report it with the "
            "model, or, if the difference is expected, --no-source-check (SOURCE_CHECK: false) converts without "
            "the check and the manifest says so",
        )


def _parity_record(run: _Run, source_record: Mapping[str, Any], base: PrecisionInfo) -> dict[str, Any]:
    """The manifest's ``source_parity``: this run's comparison, else the one recorded for the same base bytes by an
    earlier run (a re-run that reused every file has no base to compare), else why there is none."""
    from .source_parity import not_checked

    key = run.key_for(base, str(source_record.get("fingerprint")), base, None)
    if run.source_parity is not None:
        return {**run.source_parity, "base_inputs_key": key}
    if not run.opts.source_check:
        return not_checked(_PARITY_OFF).to_dict()
    for folder in run.related_folders():
        earlier = run.previous(folder)
        record = earlier.source_parity if earlier is not None else None
        if isinstance(record, dict) and record.get("checked") and record.get("base_inputs_key") == key:
            return {**record, "reused": True}
    return not_checked(
        "every file was reused from an earlier run and no record of a source check of this base was found; "
        "--force converts and checks again"
    ).to_dict()


def _ship_base(
    run: _Run, target: Target, base_precision: PrecisionInfo, files: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """FIDELITY_ON=check: the base GGUF goes into the outputs folder for the check jobs, which measure fidelity
    against it (check.py); the manifest's ``base`` names it (``file``, ``sha256``). It is no published file unless
    asked for (KEEP_BASE): publish uploads the files the manifest lists.

    Raises:
        ConversionFailed: this run has no base to ship (every file was reused): ``--force`` makes it again.
    """
    name = _file_name(run.job.model_name, base_precision)
    listed = next((f for f in files if f["name"] == name), None)
    if listed is not None:
        return {"file": name, "sha256": listed["sha256"]}
    if run.base_path is None or not run.base_path.is_file():
        raise ConversionFailed(
            f"fidelity-on=check: the base GGUF {name} was not made in this run, so it cannot go to the check jobs",
            hint="re-run with --force to make it again, or measure fidelity on the builder (FIDELITY_ON: builder)",
        )
    install_file(run.base_path, target.outputs_dir / name)
    sha = run.base_sha.result() if run.base_sha is not None else sha256_file(run.base_path)
    return {"file": name, "sha256": sha}


def _deliver(
    run: _Run,
    target: Target,
    view: dict[str, _Produced],
    source_record: dict[str, Any],
    base_precision: PrecisionInfo,
    reference: Mapping[str, Any] | None,
) -> Manifest:
    job = run.job
    files: list[dict[str, Any]] = []
    kept_base = job.options.keep_base
    for precision in [p for p in PRECISIONS.values() if p.name in view]:
        if not (target.wants(precision.name) or (kept_base and precision.name == base_precision.name)):
            continue
        item = view[precision.name]
        name = _file_name(job.model_name, precision)
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
    record = run.imatrix.record
    if record is not None and record.get("source") == "computed" and run.imatrix.path is not None:
        install_file(run.imatrix.path, target.outputs_dir / record["file"])
    if any((f.get("quantization") or {}).get("overrides") for f in files):
        # The overrides as llama-quantize reads them (--tensor-type-file), published with the card.
        from .card import tensor_types_name
        from .fsutil import atomic_write_text
        from .quant_types import tensor_type_file

        atomic_write_text(
            target.outputs_dir / tensor_types_name(job.model_name), tensor_type_file(job.options.tensor_types)
        )
    manifest = {
        "toolchain": toolchain_info().as_manifest(),
        "pair": target.pair.name if target.pair else None,
        "model_name": job.model_name,
        "trained": job.trained,
        "source": source_record,
        "base": {
            "precision": base_precision.name,
            "kept": base_precision.name in run.produced,
            **(_ship_base(run, target, base_precision, files) if fidelity_on == "check" else {}),
        },
        "fidelity_on": fidelity_on,
        "imatrix": run.imatrix.record,
        "files": files,
        "timings": run.timings,
        "runtime": {"n_gpu_layers": _layers_of(job, target)},
        "request": target.request,
        "multimodal": run.multimodal,
        "mmproj": _deliver_mmproj(run, target),
        "source_parity": _parity_record(run, source_record, base_precision),
    }
    if reference is not None:
        names = {f["name"] for f in files}
        own = {**reference, "files": {n: e for n, e in reference["files"].items() if n in names}}
        atomic_write_json(target.outputs_dir / REFERENCE_NAME, own)
    elif not _reference_current(target.outputs_dir, {f["name"]: f["sha256"] for f in files}):
        # A reference of earlier bytes would make every later check fail with "other bytes": none is better.
        (target.outputs_dir / REFERENCE_NAME).unlink(missing_ok=True)
    written = write_manifest(target.outputs_dir, manifest)
    _log.info("wrote %s", written.path)
    # Files of earlier runs that this run no longer asked for are left alone; the manifest lists this run's files.
    return written


# -- towers beyond the text model (multimodal.py): the projector files -------------------------------------------------
def _plan_towers(run: _Run, source: ModelSource) -> dict[str, Any] | None:
    """Detect the towers beyond the text model and decide: projector, refusal (raised), or text only (recorded)."""
    from .multimodal import detect_towers, plan_towers

    assert run.converter_dir is not None
    plan = plan_towers(detect_towers(source.path, source.config, run.converter_dir), text_only=run.opts.text_only)
    if plan is not None and plan["left_out"]:
        run.out.warning(
            f"TEXT_ONLY: publishing the text model alone; left out: {', '.join(plan['left_out'])} "
            "(recorded in the manifest and the card)"
        )
    return plan


def _check_mtp(run: _Run, source: ModelSource) -> None:
    """Refuse multi-token-prediction heads that the converted file does not hold (known only from the file)."""
    from .gguf_header import read_header
    from .multimodal import detect_towers, mtp_refusal

    if run.multimodal is None or "mtp" not in run.multimodal["towers"] or not run.produced:
        return
    assert run.converter_dir is not None
    towers = detect_towers(source.path, source.config, run.converter_dir)
    metadata = read_header(next(iter(run.produced.values())).path).metadata
    refusal = mtp_refusal(towers, metadata, text_only=run.opts.text_only)
    if refusal is not None:
        raise refusal


def _mmproj_keys(run: _Run, fingerprint: str) -> dict[str, str]:
    """The projector files this job writes (F16, and Q8_0 when asked) → what their bytes depend on."""
    from .multimodal import mmproj_precisions

    if run.multimodal is None or not run.multimodal["projector"]:
        return {}
    toolchain = toolchain_info().as_manifest()
    return {
        name: inputs_key(source=fingerprint, precision=name, toolchain=toolchain, made="converter --mmproj")
        for name in mmproj_precisions([p.name for p in run.job.precisions])
    }


def _mmproj_wanted(target: Target, name: str) -> bool:
    """F16 goes to every target; Q8_0 to the targets that asked for Q8_0."""
    return name == "F16" or target.wants(name)


def _mmproj_current(run: _Run, target: Target, manifest: Manifest, fingerprint: str) -> bool:
    """Whether ``manifest`` (the target's, from an earlier run) lists every projector file this job writes, current,
    and nothing was left out that this run would now export (or the reverse)."""
    if manifest.multimodal != run.multimodal:
        return False
    entries = {e.precision: e for e in manifest.mmproj or []}
    return all(
        name in entries and file_is_current(entries[name], target.outputs_dir, key)
        for name, key in _mmproj_keys(run, fingerprint).items()
        if _mmproj_wanted(target, name)
    )


def _produce_mmproj(run: _Run, source: ModelSource, stage: Path, fingerprint: str) -> None:
    """Write the projector files (``convert_hf_to_gguf.py --mmproj``), or reuse current ones from an earlier run."""
    from .multimodal import mmproj_file_name

    assert run.converter_dir is not None
    for name, key in _mmproj_keys(run, fingerprint).items():
        precision = PRECISIONS[name]
        file_name = mmproj_file_name(run.job.model_name, name)
        existing = None
        for folder in [] if run.opts.force else run.related_folders():
            manifest = run.previous(folder)
            for entry in (manifest.mmproj or []) if manifest else []:
                if entry.precision == name and file_is_current(entry, folder, key):
                    existing = _Produced(
                        path=folder / entry.name, precision=precision, key=key, sha256=entry.sha256,
                        facts={k: v for k, v in entry.to_dict().items() if k in _FACT_KEYS},
                        verification=entry.verification, made_here=False, origin=folder,
                    )  # fmt: skip
                    break
            if existing is not None:
                break
        if existing is None:
            path = stage / file_name
            with run.out.step(f"exporting the multimodal projector ({file_name})"):
                t0 = time.perf_counter()
                run_converter(
                    run.converter_dir, source, path, name.lower(), model_name=run.job.model_name, mmproj=True,
                    on_tensor=lambda n: run.out.progress(f"    converting projector tensor {n}"),
                )  # fmt: skip
                run.timings.setdefault("mmproj_s", {})[name] = round(time.perf_counter() - t0, 3)
            facts = read_back(path)
            if facts.architecture != "clip":
                raise ConversionFailed(
                    f"{file_name}: the converter wrote a {facts.architecture!r} file, not a projector ('clip')",
                    hint="nothing was published; the log has the converter's output",
                )
            existing = _Produced(
                path=path, precision=precision, key=key, sha256=sha256_file(path),
                facts={k: getattr(facts, k) for k in _FACT_KEYS},
            )  # fmt: skip
        run.mmproj[name] = existing


def _check_images(run: _Run, view: dict[str, _Produced], n_gpu_layers: int, label: str) -> dict[str, _Produced]:
    """Show the test image to the text files of ``view`` through the projector, on one runtime.

    Every text file answers with the F16 projector (its ``verification.image``); the Q8_0 projector answers with the
    Q8_0 text file, else the first one. Each projector records the first answer it gave.
    """
    from .multimodal import image_check_many

    mm_view = {name: dataclasses.replace(item) for name, item in run.mmproj.items()}
    texts = [item for item in view.values() if item.verification is not None]
    if not mm_view or not texts or not run.opts.verify:
        return mm_view
    pairs: list[tuple[_Produced, _Produced]] = []
    for name, projector in mm_view.items():
        chosen = texts if name == "F16" else [view.get(name) or texts[0]]
        pairs += [(text, projector) for text in chosen]
    where = "" if n_gpu_layers == 0 else f", n_gpu_layers={n_gpu_layers}"
    with run.out.step(f"showing the test image to {len(pairs)} file pair(s) through the projector{where}"):
        t0 = time.perf_counter()
        checks = image_check_many(
            [(t.path, p.path) for t, p in pairs], n_gpu_layers=n_gpu_layers, threads=run.opts.threads
        )
        run.timings.setdefault("image_check_s", {})[label] = round(time.perf_counter() - t0, 3)
    for text, projector in pairs:
        record = checks[(text.path, projector.path)].as_dict()
        if projector.precision.name == "F16" and text.verification is not None:
            text.verification = {**text.verification, "image": record}
        if projector.verification is None or projector.verification.get("runtime") != record["runtime"]:
            projector.verification = {**record, "model": text.path.name}
    return mm_view


def _deliver_mmproj(run: _Run, target: Target) -> list[dict[str, Any]] | None:
    """Install the projector files in ``target`` and give their manifest entries (None: no projector)."""
    from .multimodal import MMPROJ_ROLE, mmproj_file_name

    if not run.mmproj:
        return None
    view = run.mmproj_checked.get(_layers_of(run.job, target), run.mmproj)
    entries: list[dict[str, Any]] = []
    for name, item in view.items():
        if not _mmproj_wanted(target, name):
            continue
        dest = target.outputs_dir / mmproj_file_name(run.job.model_name, name)
        if dest.is_symlink() or item.path.resolve() != dest.resolve():
            install_file(item.path, dest)
        st = dest.stat()
        entries.append({
            "name": dest.name, "precision": name, "role": MMPROJ_ROLE, "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns, "sha256": item.sha256, "inputs_key": item.key, **item.facts,
            "verification": item.verification, "reused": not item.made_here,
        })  # fmt: skip
    return entries
