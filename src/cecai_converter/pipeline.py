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
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agreement import REFERENCE_NAME, make_reference
from .card import source_card_field
from .convert import run_converter
from .errors import ConfigError, ConversionFailed, UsageError
from .fsutil import atomic_write_json, install_file, outputs_lock, remove_stale_staging, sha256_file, staging_dir
from .manifest import Manifest, file_is_current, inputs_key, read_manifest, write_manifest
from .output import Output, get_logger
from .pairs import PairInfo
from .precisions import PRECISIONS, PrecisionInfo
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
    eval_text: Path | None = None
    thresholds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    verify: bool = True
    n_gpu_layers: int = 0
    #: write reference.json (what this runtime predicts for each file) so other runtimes can be checked against it
    reference: bool = False


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
        return inputs_key(
            source=fingerprint,
            precision=precision.name,
            toolchain=toolchain_info().as_manifest(),
            made=made,
            imatrix=imatrix_sha if made != "converter" else None,
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
    handlers: list[logging.Handler] = []
    root = logging.getLogger("cecai")
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


def _execute(run: _Run, started: float) -> list[Manifest]:
    job, out, opts = run.job, run.out, run.opts
    for target in job.targets:
        for stale in remove_stale_staging(target.outputs_dir):
            _log.info("removed leftovers of an interrupted run: %s", stale)
    _log.info("model %s → %s", job.model, ", ".join(p.name for p in job.precisions))
    source, source_record, pending_fingerprint = run.resolve_source()
    wanted = list(job.precisions)
    base_precision = _base_outtype(source, wanted, fidelity=opts.fidelity)
    if opts.keep_base and base_precision not in wanted:
        wanted.append(base_precision)
    needs_imatrix = [p.name for p in wanted if p.needs_imatrix]
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
            m is not None and _target_current(t, m, keys, _layers_of(job, t), opts.reference)
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
        # Each runtime among the targets (CPU, GPU offload) loads and measures the shared files itself; everything
        # is checked before anything is delivered, so a failing check leaves every target as it was.
        checked: dict[int, dict[str, _Produced]] = {}
        runtimes = _runtimes(job)
        for layers, targets in runtimes.items():
            label = "all" if len(runtimes) == 1 else f"n_gpu_layers={layers}"
            view = {name: dataclasses.replace(item) for name, item in run.produced.items()}
            _verify_all(run, view, targets, layers, label)
            if opts.fidelity and run.base_path is not None:
                _measure_fidelity(run, view, layers, label)
            checked[layers] = view
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
    with run.out.step(f"recording this runtime's predictions for {len(files)} file(s) (reference.json)"):
        t0 = time.perf_counter()
        reference = make_reference(
            {name: item.path for name, item in files.items()}, n_gpu_layers=n_gpu_layers, threads=run.opts.threads
        )
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
    quantized = [p for p in missing if p.name != base_precision.name]
    imatrix_path = run.imatrix.ensure(run, base_path, stage) if quantized and run.imatrix.available else None
    for precision in missing:
        dest = stage / _file_name(job.model_name, precision)
        if precision.name == base_precision.name:
            produced_path = base_path
        else:
            with out.step(f"quantizing to {precision.name}"):
                t0 = time.perf_counter()
                from .quantize import quantize

                quantize(
                    base_path,
                    dest,
                    precision,
                    threads=opts.threads,
                    imatrix=imatrix_path,
                    on_progress=functools.partial(_tensor_progress, out, precision.name),
                )
                run.timings["quantize_s"][precision.name] = round(time.perf_counter() - t0, 3)
            produced_path = dest
        run.produced[precision.name] = _Produced(
            path=produced_path,
            precision=precision,
            key="",  # known once the source fingerprint is
            sha256="",
            facts={},
            sha_future=run.pool.submit(sha256_file, produced_path),
        )


def _read_back_all(run: _Run) -> None:
    """Read back every file's header (its facts do not depend on the runtime) and collect its SHA-256."""
    for item in run.produced.values():
        facts = read_back(item.path, item.precision)
        item.facts = {k: getattr(facts, k) for k in _FACT_KEYS}
        if item.sha_future is not None:
            item.sha256 = item.sha_future.result()
            item.sha_future = None


def _verify_all(
    run: _Run, view: dict[str, _Produced], targets: Sequence[Target], n_gpu_layers: int, label: str
) -> None:
    """Load every file once on the runtime of ``targets`` and generate from it (all in one worker process).

    A file reused from one of these very targets keeps its earlier verification if it was made on the same
    runtime; one from a sibling pair's folder is loaded again here, since a pair's own work is verifying the file
    on its runtime.
    """
    own_folders = {t.outputs_dir for t in targets}
    to_load: list[_Produced] = []
    for item in view.values():
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


def _measure_fidelity(run: _Run, view: dict[str, _Produced], n_gpu_layers: int, label: str) -> None:
    """Measure the files made in this run against the base, on one runtime. Files reused from an earlier run keep
    the numbers recorded then (with the device they were measured on): the base they need is gone."""
    from . import fidelity

    assert run.base_path is not None
    todo = {name: item.path for name, item in view.items() if item.made_here}
    if not todo:
        return
    where = "" if n_gpu_layers == 0 else f", n_gpu_layers={n_gpu_layers}"
    with run.out.step(f"measuring fidelity against the base ({', '.join(todo)}{where})"):
        t0 = time.perf_counter()
        results = fidelity.measure(
            run.base_path, todo, eval_text=run.opts.eval_text, n_threads=run.opts.threads, n_gpu_layers=n_gpu_layers
        )
        run.timings["fidelity_s"][label] = round(time.perf_counter() - t0, 3)
    for name, metrics in results.items():
        view[name].fidelity = metrics
    if run.opts.thresholds:
        violations = fidelity.check_thresholds(results, run.opts.thresholds)
        if violations:
            raise ConversionFailed(
                "fidelity thresholds exceeded: " + "; ".join(violations),
                hint="nothing was published; relax THRESHOLDS or choose a larger precision",
            )


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
        if item.path.resolve() != dest.resolve():
            install_file(item.path, dest)
        st = dest.stat()
        files.append({
            "name": name, "precision": precision.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": item.sha256, "inputs_key": item.key, **item.facts,
            "bpw": round(st.st_size * 8 / item.facts["n_params"], 3) if item.facts.get("n_params") else None,
            "verification": item.verification, "fidelity": item.fidelity,
            "reused": not item.made_here,
        })  # fmt: skip
    record = run.imatrix.record
    if record is not None and record.get("source") == "computed" and run.imatrix.path is not None:
        install_file(run.imatrix.path, target.outputs_dir / record["file"])
    manifest = {
        "toolchain": toolchain_info().as_manifest(),
        "pair": target.pair.name if target.pair else None,
        "model_name": job.model_name,
        "trained": job.trained,
        "source": source_record,
        "base": {"precision": base_precision.name, "kept": base_precision.name in run.produced},
        "imatrix": run.imatrix.record,
        "files": files,
        "timings": run.timings,
        "runtime": {"n_gpu_layers": _layers_of(job, target)},
        "request": target.request,
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
