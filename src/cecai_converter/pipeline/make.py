"""Making the files: the base's type, the disk it needs, the conversion, the importance matrix, the quantizer, and
the read-back of every file's header (:class:`Produced` out of :class:`Made`)."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import imatrix as imatrix_mod
from ..convert import run_converter
from ..errors import ConversionFailed, UsageError
from ..fsutil import sha256_file
from ..output import Output, get_logger
from ..precisions import PRECISIONS, PrecisionInfo
from ..quant_types import TYPE_IDS, quantization_record, shape_fallbacks
from ..quantize import quantize
from ..request_options import Options
from ..source import ModelSource, source_dtype
from ..verify import read_back
from .job import FACT_KEYS, Job, Produced, Timings, file_name

__all__ = [
    "ConvertedBase",
    "Imatrix",
    "ImatrixPlan",
    "Made",
    "base_outtype",
    "check_free_space",
    "convert_base",
    "quantize_all",
    "read_back_all",
]

_log = get_logger("pipeline")


def base_outtype(source: ModelSource, wanted: Sequence[PrecisionInfo], *, fidelity: bool) -> PrecisionInfo:
    """The base file's type: lossless (the checkpoint's own float type), or the single requested type when the
    converter writes it directly, so that one conversion is the whole job. Not when fidelity is measured and that
    type is quantized: its numbers need a lossless reference."""
    only = wanted[0] if len(wanted) == 1 else None
    direct = only is not None and only.converter_outtype is not None and not only.name.startswith("TQ")
    if only is not None and direct and (only.is_float or not fidelity):
        return only
    return PRECISIONS[source_dtype(source).upper()]


def check_free_space(folder: Path, n_params: int, base: PrecisionInfo, missing: Sequence[PrecisionInfo]) -> None:
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


@dataclass(frozen=True)
class Imatrix:
    """The importance matrix the quantizer used: its file and the manifest's ``imatrix`` record."""

    path: Path
    record: dict[str, Any]

    @property
    def computed(self) -> bool:
        """Computed in this run (delivered next to the GGUF files), not given."""
        return self.record.get("source") == "computed"


@dataclass(frozen=True)
class ImatrixPlan:
    """Where this run's importance matrix comes from: a given file, llama-imatrix on a calibration text, or none.

    A given or computed matrix is used for every quantized type (it helps k-quants too); types that need one
    cannot be made without it.
    """

    given: Path | None = None
    compute: bool = False
    calibration_text: Path | None = None

    @classmethod
    def from_options(cls, opts: Options) -> ImatrixPlan:
        """The plan the options ask for; a given file or calibration text must exist."""
        if opts.imatrix is not None and not opts.imatrix.is_file():
            raise UsageError(f"importance matrix not found: {opts.imatrix}", hint="or use --imatrix auto")
        if opts.calibration_text is not None and not opts.calibration_text.is_file():
            raise UsageError(f"calibration text not found: {opts.calibration_text}")
        compute = opts.imatrix is None and (opts.compute_imatrix or opts.calibration_text is not None)
        return cls(given=opts.imatrix, compute=compute, calibration_text=opts.calibration_text)

    @property
    def available(self) -> bool:
        """Whether this run has a matrix (given, or to compute)."""
        return self.given is not None or self.compute

    def identity(self) -> str | None:
        """What quantized bytes depend on: the given file's hash, or the calibration text's (computed matrix)."""
        if self.given is not None:
            return "given:" + sha256_file(self.given)
        if self.compute:
            return "computed:" + sha256_file(self.calibration_text or imatrix_mod.default_calibration_text())
        return None

    def ensure(self, job: Job, base: Path, stage: Path, out: Output, timings: Timings) -> Imatrix:
        """The given matrix, or one computed from ``base`` into ``stage``, with its manifest record."""
        if self.given is not None:
            return Imatrix(self.given, {**imatrix_mod.load_for_quantize(self.given).describe(), "source": "given"})
        text = self.calibration_text or imatrix_mod.default_calibration_text()
        with out.step(f"computing an importance matrix with llama-imatrix on {text.name}"):
            t0 = time.perf_counter()
            # Named as it is published: llama.cpp records the name in every file quantized with it.
            out_path = stage / f"{job.model_name}.imatrix.gguf"
            path = imatrix_mod.compute(base, self.calibration_text, out_path, n_threads=job.options.threads)
            timings.took("imatrix_s", t0)
        record = {**imatrix_mod.load_for_quantize(path).describe(), "source": "computed",
                  "calibration_text": text.name, "calibration_text_sha256": sha256_file(text)}  # fmt: skip
        # Delivered next to the GGUF files (see deliver), so it can be reused as IMATRIX: FILE.
        record["file"] = f"{job.model_name}.imatrix.gguf"
        return Imatrix(path, record)


@dataclass(frozen=True)
class ConvertedBase:
    """The base GGUF the converter wrote in this run (in the staging folder)."""

    path: Path
    precision: PrecisionInfo
    #: its SHA-256, hashed in the background, when fidelity needs it and it is no file of the run (else None: the
    #: run's own hash of it is used)
    sha256: Future[str] | None = None


@dataclass(frozen=True)
class Made:
    """A file written in this run, before its read-back: its SHA-256 is still being computed in the background."""

    path: Path
    precision: PrecisionInfo
    sha256: Future[str]
    #: the quantizer's fallbacks; None: the converter wrote the file
    fallbacks: list[dict[str, str]] | None = None


def convert_base(
    job: Job,
    source: ModelSource,
    converter_dir: Path,
    stage: Path,
    base: PrecisionInfo,
    out: Output,
    timings: Timings,
) -> Path:
    """Run the converter once: the base GGUF of ``base``'s type in ``stage``."""
    base_path = stage / file_name(job.model_name, base)
    metadata = {}
    if source.repo_id:
        metadata = {"source_url": f"https://huggingface.co/{source.repo_id}", "source_hf_repo": source.repo_id}
    with out.step(f"converting {source.architecture} to a {base.name} base GGUF"):
        t0 = time.perf_counter()
        run_converter(
            converter_dir,
            source,
            base_path,
            base.converter_outtype or base.suffix,
            model_name=job.model_name,
            metadata=metadata or None,
            on_tensor=lambda n: out.progress(f"    converting tensor {n}"),
        )
        timings.took("convert_s", t0)
    return base_path


def _tensor_progress(out: Output, precision_name: str, done: int, total: int) -> None:
    out.progress(f"    {precision_name}: tensor {done}/{total}")


def quantize_all(
    job: Job,
    base: ConvertedBase,
    missing: Sequence[PrecisionInfo],
    imatrix: Imatrix | None,
    stage: Path,
    hash_file: Callable[[Path], Future[str]],
    out: Output,
    timings: Timings,
) -> dict[str, Made]:
    """Every missing file: the base itself, or the quantizer's output from it (``hash_file`` starts each hash)."""
    opts = job.options
    made: dict[str, Made] = {}
    for precision in missing:
        fallbacks = None
        if precision.name == base.precision.name:
            path = base.path
        else:
            path = stage / file_name(job.model_name, precision)
            with out.step(f"quantizing to {precision.name}"):
                t0 = time.perf_counter()
                fallbacks = quantize(
                    base.path,
                    path,
                    precision,
                    threads=opts.threads,
                    imatrix=imatrix.path if imatrix is not None else None,
                    on_progress=functools.partial(_tensor_progress, out, precision.name),
                    tensor_types=opts.tensor_types,
                )
                timings.took("quantize_s", t0, precision.name)
            if fallbacks:  # said where the user looks, not only in the manifest
                shown = ", ".join(f"{f['tensor']} {f['asked']}→{f['written']}" for f in fallbacks[:3])
                more = f" and {len(fallbacks) - 3} more" if len(fallbacks) > 3 else ""
                _log.warning(
                    f"{precision.name}: {len(fallbacks)} tensor(s) written in another type than the recipe asks "
                    f"(rows not a multiple of the block size): {shown}{more}; see quantization.fallbacks in the "
                    "manifest"
                )
        made[precision.name] = Made(path, precision, hash_file(path), fallbacks)
    return made


def _ggml_type(precision: PrecisionInfo) -> int:
    """The tensor type a converter-written precision stores its weights in (F32 for float types: no fallback)."""
    return TYPE_IDS.get(precision.name, 0) if not precision.is_float else 0


def read_back_all(
    reused: Mapping[str, Produced], made: Mapping[str, Made], keys: Mapping[str, str], tensor_types: Sequence[str]
) -> dict[str, Produced]:
    """Read back every file's header (its facts do not depend on the runtime) and collect its SHA-256: the run's
    files, the reused ones first, as the checks and the delivery see them."""
    files: dict[str, Produced] = {}
    for name, item in reused.items():
        facts = read_back(item.path, item.precision)
        files[name] = dataclasses.replace(item, facts={k: getattr(facts, k) for k in FACT_KEYS})
    for name, new in made.items():
        facts = read_back(new.path, new.precision)
        # What llama.cpp really wrote: the quantizer's own fallbacks, or (a file the converter wrote at a
        # quantized type) the weight matrices its blocks could not hold.
        quantized = new.fallbacks is not None
        quantization = quantization_record(
            facts.tensors,
            fallbacks=new.fallbacks
            if new.fallbacks is not None
            else shape_fallbacks(facts.tensors, _ggml_type(new.precision)),
            overrides=tensor_types if quantized else (),
        )
        files[name] = Produced(
            path=new.path, precision=new.precision, key=keys[name], sha256=new.sha256.result(),
            facts={k: getattr(facts, k) for k in FACT_KEYS}, quantization=quantization,
        )  # fmt: skip
    return files
