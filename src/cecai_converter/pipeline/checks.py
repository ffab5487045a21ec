"""The checks of the run's files on one runtime, before anything is delivered: load and generate (verify), fidelity
against the base, and the runtime's predictions for reference.json. Each takes the files as the earlier checks left
them and returns them with its own result added."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import fidelity
from ..agreement import N_POSITIONS, make_reference
from ..errors import ConversionFailed, VerificationFailed
from ..output import Output, get_logger
from ..runtime import runtime_facts, runtime_name
from ..verify import load_check_many
from .job import Job, Produced, Target, Timings, file_name
from .make import ConvertedBase

__all__ = ["Measured", "ReferenceRows", "measure_fidelity", "record_reference", "verify_all"]

_log = get_logger("pipeline")

#: the reference tokens and each measured file's reference.json rows (by file name), from fidelity's evaluation
ReferenceRows = tuple[list[int], dict[str, dict[str, Any]]]


def verify_all(
    job: Job,
    view: Mapping[str, Produced],
    targets: Sequence[Target],
    n_gpu_layers: int,
    label: str,
    out: Output,
    timings: Timings,
    *,
    fused: Collection[str] = (),
) -> dict[str, Produced]:
    """Load every file once on the runtime of ``targets`` and generate from it (all in one worker process).

    A file reused from one of these very targets keeps its earlier verification if it was made on the same
    runtime; one from a sibling pair's folder is loaded again here, since a pair's own work is verifying the file
    on its runtime. The files in ``fused`` (precision names) are left to fidelity, which verifies them in the load
    that measures them (:func:`measure_fidelity`).

    Returns the files of ``view`` with their verifications.
    """
    own_folders = {t.outputs_dir for t in targets}
    to_load: dict[str, Produced] = {}
    for name, item in view.items():
        if name in fused:
            continue
        kept = (
            item.verification is not None
            and not item.made_here
            and item.origin in own_folders
            and item.verification.get("runtime") == runtime_name(n_gpu_layers)
        )
        if job.options.verify and not kept:
            to_load[name] = item
    if not to_load:
        return dict(view)
    names = ", ".join(item.path.name for item in to_load.values())
    where = "" if n_gpu_layers == 0 else f", n_gpu_layers={n_gpu_layers}"
    with out.step(f"verifying {names} (load + generate{where})"):
        t0 = time.perf_counter()
        paths = [item.path for item in to_load.values()]
        checks = load_check_many(paths, n_gpu_layers=n_gpu_layers, threads=job.options.threads)
        timings.took("verify_s", t0, label)
    return {
        name: dataclasses.replace(item, verification=checks[item.path].as_dict()) if name in to_load else item
        for name, item in view.items()
    }


@dataclass(frozen=True)
class Measured:
    """What fidelity's evaluation on one runtime gave: the files with their numbers (and the verifications of the
    files verified in the same load), and reference.json's rows when it recorded them."""

    files: dict[str, Produced]
    reference_rows: ReferenceRows | None = None


def measure_fidelity(
    job: Job,
    view: Mapping[str, Produced],
    base: ConvertedBase,
    n_gpu_layers: int,
    label: str,
    out: Output,
    timings: Timings,
    *,
    verify: Collection[str] = (),
    rows_here: bool = False,
) -> Measured:
    """Measure the files made in this run against the base, on one runtime. Files reused from an earlier run keep
    the numbers recorded then (with the device they were measured on): the base they need is gone.

    ``rows_here``: reference.json's rows come from this evaluation (this is the runtime the reference is made on).
    """
    opts = job.options
    todo = {name: item.path for name, item in view.items() if item.made_here}
    if not todo:
        return Measured(dict(view))
    where = "" if n_gpu_layers == 0 else f", n_gpu_layers={n_gpu_layers}"
    budget = None if opts.fidelity_tokens == "all" else fidelity.Budget(target=opts.fidelity_target)
    base_sha = next((i.sha256 for i in view.values() if i.path == base.path and i.sha256), None)
    if base_sha is None and base.sha256 is not None:
        base_sha = base.sha256.result()
    with out.step(f"measuring fidelity against the base ({', '.join(todo)}{where})"):
        t0 = time.perf_counter()
        measured = fidelity.measure_run(
            base.path, todo, eval_text=opts.eval_text, n_threads=opts.threads, n_gpu_layers=n_gpu_layers,
            budget=budget, cache_root=fidelity.default_cache_root(), base_sha256=base_sha,
            reference_positions=N_POSITIONS if rows_here else 0, verify=verify,
        )  # fmt: skip
        timings.took("fidelity_s", t0, label)
    results = measured.results
    verifications: dict[str, dict[str, Any]] = {}
    for name in verify:  # what verify.load_check_many checks, for the files verified in fidelity's load
        check = measured.verifications.get(name)
        if check is None:
            raise VerificationFailed(f"the fidelity worker reported no verification for {view[name].path.name}")
        if not check.get("generated_tokens"):
            raise VerificationFailed(f"{view[name].path.name} loaded but generated no tokens")
        verifications[name] = check
    # Observable without timing: a re-run on the same base evaluates 0 of its positions (fidelity's cache).
    timings.set("fidelity_base_tokens", measured.base_tokens_evaluated, label)
    _log.info(
        "fidelity: base evaluated on %d new position(s)%s; %s",
        measured.base_tokens_evaluated,
        " (cached from an earlier run)" if measured.base_tokens_evaluated == 0 else "",
        ", ".join(f"{name}: {r['n_tokens']} positions" for name, r in results.items()),
    )
    rows: ReferenceRows | None = None
    if rows_here and measured.reference_rows:
        rows = (
            measured.reference_tokens,
            {file_name(job.model_name, view[name].precision): r for name, r in measured.reference_rows.items()},
        )
    files = {}
    for name, item in view.items():
        if name in verifications:
            item = dataclasses.replace(item, verification=verifications[name])
        if name in results:
            item = dataclasses.replace(item, fidelity=results[name])
        files[name] = item
    if opts.thresholds:
        violations = fidelity.check_thresholds(results, opts.thresholds)
        if violations:
            raise ConversionFailed(
                "fidelity thresholds exceeded: " + "; ".join(violations),
                hint="nothing was published; relax THRESHOLDS or choose a larger precision",
            )
    return Measured(files, rows)


def record_reference(
    job: Job,
    produced: Mapping[str, Produced],
    rows: ReferenceRows | None,
    n_gpu_layers: int,
    out: Output,
    timings: Timings,
) -> dict[str, Any]:
    """What the builder's runtime predicts for every file of this run (reference.json), for other runtimes to be
    checked against."""
    files = {file_name(job.model_name, item.precision): item for item in produced.values()}
    tokens, measured_rows = rows if rows is not None else ([], {})
    # Files whose fidelity was measured have their rows from that evaluation; the others (reused, or fidelity off)
    # are loaded here, on the same tokens.
    rest = {name: item.path for name, item in files.items() if name not in measured_rows}
    t0 = time.perf_counter()
    if rest:
        with out.step(f"recording this runtime's predictions for {len(rest)} file(s) (reference.json)"):
            reference = make_reference(
                rest,
                n_gpu_layers=n_gpu_layers,
                threads=job.options.threads,
                tokens=list(tokens) if measured_rows else None,
            )
    else:
        reference = make_reference({}, n_gpu_layers=n_gpu_layers)
    if measured_rows:
        reference.update(tokens=list(tokens), runtime=runtime_facts(n_gpu_layers))
        reference["files"] = {name: {**(measured_rows.get(name) or reference["files"][name])} for name in files}
    timings.took("reference_s", t0)
    for name, item in files.items():
        reference["files"][name]["sha256"] = item.sha256
    return reference
