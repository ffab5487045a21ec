"""``cecai-convert check OUTDIR --pair P``: files made once, checked on one pair's own runtime.

The builder (``cecai-convert convert``, the release flow's *make* job) leaves an outputs folder with the GGUF files,
``manifest.json`` and ``reference.json`` (what its runtime predicts for each file, :mod:`cecai_converter.agreement`).
A check takes those same bytes to a pair's runtime (its runner, or its image with ``--backend docker``) and records:

* the SHA-256 of every file against the manifest and the reference (the bytes are the ones the builder made);
* that the runtime loads each file and generates from it;
* prompt and generation tokens per second, peak memory, and the layers offloaded to a GPU;
* agreement with the builder's runtime on the same file: KL-divergence (mean and max) and top-1 agreement between
  the two runtimes' next-token distributions. CPU against CUDA on one file is near zero; a broken backend or a
  miscompiled kernel is not.

Limits (``--max-kld``, ``--min-top1``) fail the check with the file, the pair and the numbers. The record is written
either way (``<model>.<pair slug>.check.json``), so a release can say what failed; the exit status is 1 on failure.
A GPU pair whose runtime cannot offload fails too: a CUDA pair checked on a CPU build proves nothing about CUDA
(``--n-gpu-layers 0`` checks it on the CPU on purpose, and the record says so).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from . import __version__, environment, fidelity
from .agreement import REFERENCE_NAME, Agreement, check_reference_fits, compare, read_reference
from .backends import BACKENDS
from .backends.container_spec import check_spec
from .backends.docker import run_check
from .errors import EXIT_OK, BadReference, CheckFailed, ConverterError, UsageError
from .fidelity import threshold_value
from .fsutil import atomic_write_json, refuse_symlink, refuse_unsafe_target, sha256_file, write_target
from .manifest import MANIFEST_NAME, FileEntry, Manifest, load_manifest, read_manifest
from .multimodal import MMPROJ_ROLE, image_check_many
from .output import Output, decimal_size
from .pairs import PairInfo, parse_pair
from .processes import thread_count
from .records import CHECK_SCHEMA, CheckRecord, CheckRow, failure_message, read_record, record_name
from .runtime import default_gpu_layers, gpu_layer_count, runtime_facts
from .runtime import runtime_name as runtime_name_of
from .toolchain import require_runtime
from .verify import load_check_many

__all__ = [
    "DEFAULT_LIMITS",
    "CheckFailed",
    "Limits",
    "check_folder",
    "register",
]


@dataclass(frozen=True)
class Limits:
    """What a pair's runtime may differ from the builder's on the same file.

    Defaults: runtimes that compute the same thing agree to within rounding (KL-divergence around 1e-6 between CPU
    builds, around 1e-4 to 1e-3 between CPU and CUDA kernels); 0.01 nats is the difference between Q8_0 and Q6_K
    on a trained 8B model, far above rounding and far below a broken kernel.
    """

    max_kld: float = 0.01
    min_top1: float = 0.90

    def as_dict(self) -> dict[str, float]:
        """The record's ``limits``."""
        return {"max_kld": self.max_kld, "min_top1": self.min_top1}

    @classmethod
    def parse(cls, max_kld: float | None, min_top1: float | None) -> Limits:
        """Limits from optional values, each checked.

        Raises:
            UsageError: a limit outside its range.
        """

        kld = cls.max_kld if max_kld is None else threshold_value("max_kld", max_kld, "--max-kld", error=UsageError)
        top1 = (
            cls.min_top1 if min_top1 is None else threshold_value("min_top1", min_top1, "--min-top1", error=UsageError)
        )
        return cls(max_kld=kld, min_top1=top1)


DEFAULT_LIMITS: Final = Limits()


def _file_problems(agreement: Agreement, limits: Limits) -> list[str]:
    problems: list[str] = []
    kld, top1 = agreement.kld_mean, agreement.top1_agreement
    if not math.isfinite(kld) or kld > limits.max_kld:
        problems.append(f"KL-divergence against the builder's runtime {kld:.3g} is above max_kld {limits.max_kld:g}")
    if not math.isfinite(top1) or top1 < limits.min_top1:
        problems.append(f"top-1 agreement with the builder's runtime {top1:.3f} is below min_top1 {limits.min_top1:g}")
    return problems


def check_folder(
    folder: Path,
    pair: PairInfo,
    *,
    limits: Limits = DEFAULT_LIMITS,
    n_gpu_layers: int | None = None,
    threads: int | None = None,
    out: Output | None = None,
    fidelity: str = "auto",
    backend: str = "local",
    image: str | None = None,
) -> CheckRecord:
    """Check every file of a builder's outputs folder on this machine's runtime, as ``pair``.

    With ``fidelity`` (``auto``: when the manifest says ``fidelity_on: check`` and this runtime offloads to a GPU;
    ``true``; ``false``) each file's fidelity is also measured against the base the builder shipped, and the record
    carries it (``fidelity`` per file, and what was measured at the top). ``backend`` and ``image`` are what the
    record names as where the check ran (the docker backend's check container passes its own).

    Returns:
        The check record (see the module docstring); ``record.passed`` says whether every file passed.

    Raises:
        UsageError: the folder is not a builder's outputs folder (no manifest, no reference, a file missing);
            ManifestError (a UsageError) when its manifest is malformed; SymlinkRefused (a UsageError) when a
            file it lists is a symbolic link.
        ConverterError: the runtime is not installed.
    """

    try:
        manifest = load_manifest(folder / MANIFEST_NAME)
    except FileNotFoundError:
        raise UsageError(
            f"{folder}: no {MANIFEST_NAME}",
            hint="pass the folder `cecai-convert convert` wrote (the release flow's make artifact)",
        ) from None
    reference = read_reference(folder / REFERENCE_NAME)
    entries = manifest.files
    if not entries:
        raise UsageError(f"{folder / MANIFEST_NAME} lists no files to check")
    require_runtime()
    problems: list[str] = []
    layers = default_gpu_layers(pair) if n_gpu_layers is None else n_gpu_layers
    runtime = {**runtime_facts(layers), "backend": backend}
    if image:
        runtime["image"] = image
    if pair.gpu and n_gpu_layers is None and layers == 0:
        problems.append(
            f"{pair.name} is a GPU pair but this llama-cpp-python cannot offload to a GPU: checking it here would "
            "prove nothing about its runtime (run the check in the pair's image, --backend docker, or pass "
            "--n-gpu-layers 0 to check it on the CPU on purpose)"
        )
    files: list[dict[str, Any]] = []
    for entry in entries:
        name = entry.name
        path = folder / name
        refuse_symlink(path, where=f"{folder / MANIFEST_NAME} lists {name!r}: ")
        if not name or Path(name).name != name or not path.is_file():
            raise UsageError(f"{folder / MANIFEST_NAME} lists {name!r}, which is not a file in {folder}")
        digest = sha256_file(path)
        ref_sha = (reference["files"].get(name) or {}).get("sha256")
        row: dict[str, Any] = {
            "name": name,
            "precision": entry.precision,
            "sha256": digest,
            "sha256_match": digest == entry.sha256 and (ref_sha is None or digest == ref_sha),
            "problems": [],
        }
        if not row["sha256_match"]:
            row["problems"].append(
                f"sha256 {digest[:12]}… is not the builder's {entry.sha256[:12]}…: other bytes than "
                "the ones made and measured"
            )
        files.append(row)
    for row in files:  # the reference against each file's vocabulary and context, before any work (exit 2)
        check_reference_fits(reference, row["name"], folder / row["name"], where=str(folder / REFERENCE_NAME))
    say = out.info if out is not None else (lambda _m: None)
    by_name = {row["name"]: row for row in files}
    if not problems:
        say(f"loading {len(files)} file(s) on {runtime['device']} ({runtime['machine']}) as {pair.name}")
        try:
            loads = load_check_many([folder / r["name"] for r in files], n_gpu_layers=layers, threads=threads)
        except ConverterError as exc:
            problems.append(exc.message)
            loads = {}
        for path, result in loads.items():
            by_name[path.name]["generated_tokens"] = len(result.generated_tokens)
        for row in files:
            if "generated_tokens" not in row:
                row["problems"].append("not loaded: the runtime failed on this or an earlier file")
                continue
            say(f"comparing {row['name']} with the builder's runtime")
            try:
                agreement = compare(reference, row["name"], folder / row["name"], n_gpu_layers=layers, threads=threads)
            except BadReference:
                raise  # an input error, not this runtime's: nothing to record
            except ConverterError as exc:
                row["problems"].append(exc.message)
                continue
            row["agreement"] = agreement.as_dict()
            row["problems"] += _file_problems(agreement, limits)
    fidelity_record = _fidelity(folder, manifest, files, problems, fidelity, layers, threads, say)
    for row in files:
        row["passed"] = not row["problems"] and not problems and "agreement" in row
    files += _check_projectors(folder, manifest.mmproj or [], files, problems, layers, threads, say)
    # The rows are built up as plain objects while the work goes (each phase adds its keys); the record is typed once.
    return CheckRecord(
        schema=CHECK_SCHEMA,
        tool={"name": "cecai-converter", "version": __version__},
        pair=pair.name,
        model_name=manifest.model_name,
        passed=all(r["passed"] for r in files) and not problems,
        runtime=runtime,
        reference_runtime=reference.get("runtime"),
        limits=limits.as_dict(),
        problems=problems,
        fidelity=fidelity_record,
        files=[CheckRow.from_dict(row) for row in files],
    )


#: ``--fidelity``: measure each file's fidelity here (see :func:`_fidelity`).
FIDELITY_MODES: Final = ("auto", "true", "false")


def _fidelity(
    folder: Path,
    manifest: Manifest,
    rows: list[dict[str, Any]],
    problems: list[str],
    mode: str,
    layers: int,
    threads: int | None,
    say: Callable[[str], None],
) -> dict[str, Any] | None:
    """FIDELITY_ON=check: each loaded file measured against the base the builder shipped (the manifest's
    ``base.file``, its SHA-256 checked), on this runtime, with the builder's target and thresholds. Rows get
    ``fidelity`` (the builder's record format, with this runtime's ``device``); a breached threshold is a row
    problem. Returns the record's ``fidelity`` (None when the manifest does not ask for it and ``mode`` is not
    ``true``).

    Raises:
        UsageError: ``mode`` is ``true`` but the builder shipped no base (its manifest's fidelity_on is not check).
    """
    asked = manifest.fidelity_on == "check"
    if mode == "false" or (mode == "auto" and not asked):
        return {"measured": False, "reason": "turned off (--fidelity false)"} if asked else None
    base = manifest.base_record
    name, sha = base.file, base.sha256
    if name is None or sha is None:
        raise UsageError(
            f"{folder / MANIFEST_NAME}: no base GGUF to measure fidelity against (its fidelity_on is "
            f"{manifest.fidelity_on!r}, not 'check')",
            hint="convert with --fidelity-on check (FIDELITY_ON: check) so that the builder ships its base",
        )
    record: dict[str, Any] = {"measured": False, "reason": None, "base": name, "base_sha256": sha}
    if mode == "auto" and layers == 0:
        record["reason"] = (
            "this runtime offloads no layer to a GPU: with --fidelity auto only a GPU check measures it "
            "(--fidelity true measures it here)"
        )
        return record
    if problems:
        record["reason"] = "not measured: the check has problems of its own"
        return record
    path = folder / name
    refuse_symlink(path, where=f"{folder / MANIFEST_NAME} base.file {name!r}: ")
    if Path(name).name != name or not path.is_file():
        raise UsageError(f"{folder / MANIFEST_NAME}: base.file {name!r} is not a file in {folder}")
    if sha256_file(path) != sha:
        problems.append(f"the base {name} is not the builder's (sha256 differs from the manifest's base.sha256)")
        record["reason"] = "the base's bytes are not the builder's"
        return record

    values = manifest.request_values
    budget: fidelity.Budget | None = None  # the builder's target (FIDELITY_TARGET), or the whole text
    if values.fidelity_tokens != "all":
        target = values.fidelity_target
        budget = fidelity.Budget(target=target) if target is not None else fidelity.Budget()
    todo = {str(r["precision"]): folder / r["name"] for r in rows if r.get("generated_tokens") and r["sha256_match"]}
    if values.eval_text:  # the builder's own text stays on the builder: the record says which text it was
        record["eval_text"] = "shipped (the builder's EVAL_TEXT is not in the outputs folder)"
    say(f"measuring fidelity of {len(todo)} file(s) against {name} on this runtime")
    try:
        results = fidelity.measure(path, todo, n_threads=threads, n_gpu_layers=layers, budget=budget)
    except ConverterError as exc:
        problems.append(f"fidelity could not be measured: {exc.message}")
        record["reason"] = "the measurement failed"
        return record
    thresholds = values.thresholds or {}
    for row in rows:
        metrics = results.get(str(row["precision"]))
        if metrics is None:
            row["problems"].append("fidelity not measured: the file was not loaded or is not the builder's")
            continue
        row["fidelity"] = dict(metrics)
        row["problems"] += fidelity.check_thresholds({str(row["precision"]): metrics}, thresholds)
    record.update(measured=True, device=runtime_name_of(layers))
    return record


def _check_projectors(
    folder: Path,
    entries: Sequence[FileEntry],
    text_rows: Sequence[Mapping[str, Any]],
    problems: Sequence[str],
    layers: int,
    threads: int | None,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Rows for a vision model's projector files (``mmproj``): the bytes against the manifest, then the test image
    shown through each projector with a text file of the folder (the Q8_0 one for a Q8_0 projector, else the first).
    """

    rows: list[dict[str, Any]] = []
    for entry in entries:
        path = folder / entry.name
        refuse_symlink(path, where=f"{folder / MANIFEST_NAME} lists {entry.name!r}: ")
        if Path(entry.name).name != entry.name or not path.is_file():
            raise UsageError(f"{folder / MANIFEST_NAME} lists {entry.name!r}, which is not a file in {folder}")
        digest = sha256_file(path)
        row: dict[str, Any] = {"name": entry.name, "precision": entry.precision, "role": MMPROJ_ROLE,
                               "sha256": digest, "sha256_match": digest == entry.sha256, "problems": []}  # fmt: skip
        if not row["sha256_match"]:
            row["problems"].append(f"sha256 {digest[:12]}… is not the builder's {entry.sha256[:12]}…")
        rows.append(row)
    texts = {str(r["precision"]): r["name"] for r in text_rows if r.get("generated_tokens")}
    if rows and texts and not problems:
        first = next(iter(texts.values()))
        pairs = [(folder / texts.get(str(r["precision"]), first), folder / r["name"]) for r in rows]
        say(f"showing the test image through {len(rows)} projector file(s)")
        try:
            checks = image_check_many(pairs, n_gpu_layers=layers, threads=threads)
        except ConverterError as exc:
            for row in rows:
                row["problems"].append(exc.message)
            checks = {}
        for row, pair in zip(rows, pairs, strict=True):
            if pair in checks:
                row["image"] = {**checks[pair].as_dict(), "model": pair[0].name}
    for row in rows:
        if "image" not in row and not row["problems"]:
            row["problems"].append("not shown the test image: no text file of the folder loaded")
        row["passed"] = not row["problems"] and not problems and "image" in row
    return rows


def _number(value: float | None, spec: str) -> str:
    """A measurement as ``spec`` formats it; ``?`` where the record has none (a record read back from a container)."""
    return "?" if value is None else format(value, spec)


def _human(record: CheckRecord, path: Path) -> str:
    rt = record.runtime_record
    lines = [
        f"{record.pair}: {'passed' if record.passed else 'FAILED'} on {rt.device} ({rt.machine}, "
        f"llama-cpp-python {rt.llama_cpp_python}, backend {'local' if rt.backend is None else rt.backend}) — "
        f"record {path}"
    ]
    for row in record.rows:
        agr, image = row.agreement_record, row.image_record
        peak = None if agr is None or agr.peak_rss_mib is None else decimal_size(agr.peak_rss_mib * 2**20)
        numbers = (
            f"kld {_number(agr.kld_mean, '.2e')} (max {_number(agr.kld_max, '.2e')}) "
            f"top-1 {_number(agr.top1_agreement, '.1%')} "
            f"prompt {_number(agr.prompt_tps, '.0f')} tok/s gen {_number(agr.gen_tps, '.0f')} tok/s "
            f"peak {peak or '?'} offloaded {agr.offloaded_layers}/{agr.total_layers}"
            if agr is not None
            else f"test image: {image.image_tokens} image tokens, "
            f"{len(image.generated_tokens)} tokens generated (with {image.model})"
            if image is not None
            else "no measurement"
        )
        lines.append(f"  {'ok  ' if row.passed else 'FAIL'} {row.name:<36} sha256 {str(row.sha256)[:12]}  {numbers}")
        lines += [f"       {p}" for p in row.problems or []]
    lines += [f"  {p}" for p in record.problems or []]
    return "\n".join(lines)


def _run(args: argparse.Namespace, out: Output) -> int:
    folder: Path = args.folder.resolve()
    pair = parse_pair(args.pair)
    limits = Limits.parse(args.max_kld, args.min_top1)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    manifest = read_manifest(folder)
    model_name = (manifest.model_name if manifest else None) or folder.name
    # Not resolve(): a link planted at the record's name would be followed; the safe writer refuses it instead.
    record_path: Path = write_target(args.record or folder / record_name(model_name, pair))
    refuse_unsafe_target(record_path)  # before the work, not after it
    if args.backend == "docker":
        # The container writes its record into a folder of its own: OUTDIR stays a read-only mount even when the
        # record is meant to end up inside it.
        with tempfile.TemporaryDirectory(prefix="cecai-check-") as tmp:
            spec = check_spec(
                folder,
                Path(tmp) / record_path.name,
                pair=pair,
                image=args.image,
                limits=limits,
                n_gpu_layers=args.n_gpu_layers,
                threads=args.threads,
                verbose=out.verbose,
                fidelity=args.fidelity,
            )
            run_check(spec, Output("human", verbose=out.verbose, stdout=out.stderr, stderr=out.stderr))
            record = CheckRecord.from_dict(read_record(Path(tmp) / record_path.name))
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_path, record.to_dict())
    else:
        record = check_folder(
            folder, pair, limits=limits, n_gpu_layers=args.n_gpu_layers, threads=args.threads, out=out,
            fidelity=args.fidelity,
            # Inside a check container the docker backend names its backend and image (CECAI_CHECK_BACKEND,
            # CECAI_CHECK_IMAGE).
            backend=environment.text(environment.CHECK_BACKEND, default="local") or "",
            image=environment.text(environment.CHECK_IMAGE),
        )  # fmt: skip
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_path, record.to_dict())
    out.result(_human(record, record_path), {"record": str(record_path), **record.to_dict()})
    if not record.passed:
        raise CheckFailed(
            failure_message(record),
            hint=f"the record is in {record_path}; a release with a failed check stays a draft",
        )
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``check`` command."""
    p = subparsers.add_parser(
        "check",
        help="check a builder's GGUF files on this pair's runtime (sha256, load, speed, agreement)",
        description="Check the files in an outputs folder of `cecai-convert convert` (GGUF files, manifest.json, "
        "reference.json) on the runtime of PAIR: same bytes, loads and generates, tokens/s, peak memory, layers "
        "offloaded, and agreement with the builder's runtime (KL-divergence, top-1). Writes "
        "<model>.<pair slug>.check.json; exits 1 when a limit is exceeded.",
    )
    p.add_argument("folder", type=Path, metavar="OUTDIR", help="the builder's outputs folder")
    p.add_argument("--pair", required=True, help="the pair whose runtime this is (CPU_LLM_LLAMA, gpu, …)")
    p.add_argument("--record", type=Path, help="where to write the check record (default: in OUTDIR)")
    p.add_argument(
        "--max-kld", type=float, help=f"largest mean KL-divergence allowed (default {DEFAULT_LIMITS.max_kld})"
    )
    p.add_argument(
        "--min-top1", type=float, help=f"smallest top-1 agreement allowed (default {DEFAULT_LIMITS.min_top1})"
    )
    p.add_argument(
        "--n-gpu-layers",
        type=gpu_layer_count,
        metavar="N",
        help="layers to offload, -1 for all (default: all on GPU pairs, else 0)",
    )
    p.add_argument("--threads", type=thread_count, help="CPU threads (default: the free cores)")
    p.add_argument(
        "--fidelity",
        choices=FIDELITY_MODES,
        default="auto",
        help="measure each file's fidelity against the base the builder shipped (FIDELITY_ON=check): auto (when the "
        "manifest asks and this runtime offloads to a GPU), true, false",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="docker: run the check in the pair's image (OUTDIR read-only, GPUs per pair)",
    )
    p.add_argument("--image", help="docker backend: the image (default: the pair's tag)")
    p.set_defaults(handler=_run)
