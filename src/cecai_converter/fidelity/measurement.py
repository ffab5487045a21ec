"""The parent side: :func:`measure` and :func:`measure_run` drive the worker (:mod:`.worker`), the base first and
each candidate after it, and turn each reply into the manifest's record (the keys of :data:`RESULT_KEYS`).

llama.cpp runs in a worker subprocess: a model that makes it abort becomes a :class:`MeasurementFailed`, not a dead
caller.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from ..errors import ConfigError, ConverterError, MeasurementFailed, WorkerFailed
from ..fsutil import refuse_symlink, sha256_file
from ..processes import run_worker
from ..runtime import runtime_env
from ..texts import MAX_TEXT_TOKENS
from .budget import Budget
from .cache import _cached_chunks, _prune_cache, base_cache_key

#: The shipped evaluation text (self-written English prose, ~2,700 Llama tokens).
DEFAULT_EVAL_TEXT: Final = "eval.txt"
#: The keys of one result, as the manifest's ``files[].fidelity`` holds them.
RESULT_KEYS: Final = (
    "kld_mean",
    "kld_mean_se",
    "kld_median",
    "kld_p99",
    "kld_p99_9",
    "kld_max",
    "ppl",
    "ppl_base",
    "ppl_delta_pct",
    "ppl_ratio",
    "ppl_ratio_se",
    "top1_agreement",
    "top1_agreement_se",
    "prompt_tps",
    "gen_tps",
    "device",
    "n_tokens",
    "budget",
)
# Smallest chunk worth scoring: half of it is context.
_MIN_CHUNK: Final = 32
_TAIL_CHARS: Final = 3000


def default_eval_text() -> Path:
    """The evaluation text that ships with the package."""
    return Path(str(resources.files("cecai_converter") / "data" / DEFAULT_EVAL_TEXT))


@dataclass
class FidelityRun:
    """What :func:`measure_run` found.

    Attributes:
        results: label → the keys of :data:`RESULT_KEYS`, in the order of the candidates.
        base_tokens_evaluated: positions of the base evaluated by this call (0 when the cache had them all).
        reference_tokens: the token ids whose predictions ``reference_rows`` hold (the first positions of the
            first chunk), empty when none were asked for.
        reference_rows: label → ``{"ids", "logprobs"}``, the runtime reference's rows (agreement.py's layout) from
            the same evaluation that measured the file.
    """

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_tokens_evaluated: int = 0
    reference_tokens: list[int] = field(default_factory=list)
    reference_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: label → the load-and-generate record (verify.LoadCheck's fields) of the files asked to be verified
    verifications: dict[str, dict[str, Any]] = field(default_factory=dict)


def measure(
    base: Path,
    candidates: Mapping[str, Path],
    *,
    eval_text: Path | None = None,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    n_ctx: int = 512,
    max_tokens: int | None = None,
    timeout_s: float | None = None,
    budget: Budget | None = None,
) -> dict[str, dict[str, Any]]:
    """Measure every candidate GGUF against the base GGUF on one evaluation text.

    Args:
        base: the reference GGUF (the run's F32/F16/BF16 file).
        candidates: label (usually the precision name) → GGUF file to judge. The base itself may be one of them
            (its KL-divergence is then 0).
        eval_text: a UTF-8 text file; default: the shipped ``data/eval.txt``.
        n_threads: CPU threads for llama.cpp (default: llama-cpp-python's choice).
        n_gpu_layers: layers to offload (``-1`` = all); only has an effect with a GPU build of llama-cpp-python.
        n_ctx: chunk length in tokens; capped at the model's training context.
        max_tokens: evaluate at most this many tokens of the text (keeps CI fast); ``None`` = all of it.
        timeout_s: give up on one model's evaluation after this many seconds.
        budget: stop each candidate once its error bars reach the budget's target (:func:`stop_reason`); ``None``:
            every chunk of the text (as ``llama-perplexity --kl-divergence`` does).

    Returns:
        label → a dict with the keys of :data:`RESULT_KEYS` (see the module docstring), in the order of
        ``candidates``.

    Raises:
        UsageError: a file is missing or the text is unreadable or too short.
        MeasurementFailed: llama.cpp failed or crashed on a model; the message names it and keeps its log tail.
    """
    return measure_run(
        base, candidates, eval_text=eval_text, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
        max_tokens=max_tokens, timeout_s=timeout_s, budget=budget,
    ).results  # fmt: skip


def measure_run(
    base: Path,
    candidates: Mapping[str, Path],
    *,
    eval_text: Path | None = None,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    n_ctx: int = 512,
    max_tokens: int | None = None,
    timeout_s: float | None = None,
    budget: Budget | None = None,
    cache_root: Path | None = None,
    base_sha256: str | None = None,
    reference_positions: int = 0,
    verify: Collection[str] = (),
) -> FidelityRun:
    """:func:`measure`, with the base's evaluation kept between runs and the runtime reference's rows.

    The base is evaluated chunk by chunk, only as far as some candidate needs it: first enough for
    ``budget.min_tokens``, then, each time a candidate's error bars are still too wide, as far as those candidates
    likely need (:func:`tokens_needed`; one chunk more at least); such a candidate is loaded again and goes on where
    it stopped. Its log-probabilities are kept in ``cache_root`` under a key of
    the base's bytes, the text, ``n_ctx`` and ``max_tokens`` (:func:`base_cache_key`), so a later run on the same
    base evaluates only the chunks it has not seen.

    Args:
        cache_root: where base evaluations are kept (:func:`default_cache_root`); ``None``: a temporary folder.
        base_sha256: the base's SHA-256 when the caller has it (hashed here otherwise, for the cache key).
        reference_positions: also return each candidate's top-k predictions on the first this many positions of
            the first chunk (agreement.py's reference rows; at most the chunk length), from the same load.
        verify: labels of candidates to verify in the same load (:func:`cecai_converter.verify.generate_check`:
            a few tokens generated greedily), before their chunks are evaluated.
        The others: as :func:`measure`.
    """
    text_path = Path(eval_text) if eval_text is not None else default_eval_text()
    for label, path in [("base", base), *candidates.items()]:
        if not Path(path).is_file():
            raise ConfigError(f"fidelity: {label} GGUF not found: {path}")
    if not text_path.is_file():
        raise ConfigError(
            f"fidelity: evaluation text not found: {text_path}",
            hint="EVAL_TEXT is relative to configurations/; remove it to use the shipped text",
        )
    if n_ctx < _MIN_CHUNK:
        raise ConfigError(f"fidelity: n_ctx must be at least {_MIN_CHUNK}, got {n_ctx}")
    if max_tokens is not None and max_tokens < _MIN_CHUNK:
        raise ConfigError(f"fidelity: max_tokens must be at least {_MIN_CHUNK}, got {max_tokens}")
    # The work stays bounded whatever the text: at most MAX_TEXT_TOKENS are scored (a 5 MB text ran for minutes).
    max_tokens = MAX_TEXT_TOKENS if max_tokens is None else min(max_tokens, MAX_TEXT_TOKENS)

    common = {"n_threads": n_threads, "n_gpu_layers": n_gpu_layers}
    run = FidelityRun()
    with tempfile.TemporaryDirectory(prefix="cecai-fidelity-") as tmp:
        if cache_root is None:
            work = Path(tmp) / "base"
        else:
            key = base_cache_key(base_sha256 or sha256_file(Path(base)), text_path, n_ctx=n_ctx, max_tokens=max_tokens)
            work = Path(cache_root) / key[:40]
            # the worker writes the base's files in it: never through a link planted at its name
            refuse_symlink(work, why="refusing to write the base's cached evaluation through it",
                           hint=f"remove {work} (fidelity's cache; it is rebuilt)")  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        os.utime(work)  # most recently used: the last one pruned
        meta, ready = _cached_chunks(work)

        min_chunks = 0 if budget is None else budget.min_chunks

        def ensure_base(want_tokens: int | None) -> None:
            """Have the base's first chunks on disk, enough for ``want_tokens`` scored positions (None: all) and the
            budget's fewest chunks."""
            nonlocal meta, ready
            if meta is not None:
                per_chunk = int(meta["n_ctx"]) - int(meta["n_ctx"]) // 2 - 1
                total = int(meta["n_chunks"])
                need = total if want_tokens is None else min(total, max(-(-want_tokens // per_chunk), min_chunks))
                if ready >= need:
                    return
            info = _run_worker(
                "base",
                {
                    **common,
                    "role": "base",
                    "model": str(base),
                    "work": str(work),
                    "text": str(text_path),
                    "n_ctx": n_ctx,
                    "max_tokens": max_tokens,
                    "want_tokens": want_tokens,
                    "min_chunks": min_chunks,
                },
                label="base",
                model=Path(base),
                timeout_s=timeout_s,
            )
            run.base_tokens_evaluated += int(info["evaluated_tokens"])
            meta, ready = _cached_chunks(work)

        ensure_base(None if budget is None else budget.min_tokens)
        assert meta is not None  # the worker wrote it, or raised
        n_ref = min(max(reference_positions, 0), int(meta["n_ctx"]))
        pending = dict(candidates)
        states = {label: Path(tmp) / f"state-{i}" for i, label in enumerate(candidates)}
        while pending:
            wanted: list[int] = []
            for label, path in list(pending.items()):
                res = _run_worker(
                    "candidate",
                    {
                        **common,
                        "role": "candidate",
                        "model": str(path),
                        "work": str(work),
                        "state": str(states[label]),
                        "n_ctx": meta["n_ctx"],
                        "n_vocab": meta["n_vocab"],
                        "chunks_ready": ready,
                        "n_chunks": meta["n_chunks"],
                        "budget": None if budget is None else dataclasses.asdict(budget),
                        "reference_positions": n_ref,
                        "verify": label in verify,
                    },
                    label=label,
                    model=Path(path),
                    timeout_s=timeout_s,
                )
                if "verification" in res:
                    run.verifications[label] = res["verification"]
                if "reference" in res:
                    run.reference_tokens = res["reference"]["tokens"]
                    run.reference_rows[label] = {k: res["reference"][k] for k in ("ids", "logprobs")}
                if res["status"] == "more":
                    wanted.append(int(res.get("need_tokens") or 0))
                    continue
                pending.pop(label)
                run.results[label] = _result(res, budget, meta)
            if pending:
                before = ready
                per_chunk = int(meta["n_ctx"]) - int(meta["n_ctx"]) // 2 - 1
                # As far as the files still short of their error bars likely need (each is loaded again for the
                # rest): one chunk more at least, never chunks nobody asked for.
                ensure_base(max([(ready + 1) * per_chunk, *wanted]))
                if ready <= before:  # the base cannot go further: never loop
                    raise MeasurementFailed(f"fidelity: the base's evaluation stopped at chunk {ready}")
        run.results = {label: run.results[label] for label in candidates}
    if cache_root is not None:
        _prune_cache(Path(cache_root), work)
    return run


def _result(res: Mapping[str, Any], budget: Budget | None, meta: Mapping[str, Any]) -> dict[str, Any]:
    """One candidate's manifest record from its worker's reply."""
    n = int(res["n_tokens"])
    ppl = math.exp(res["nll_sum"] / n)
    ppl_base = math.exp(res["nll_base_sum"] / n)
    bars = res["error_bars"]
    kld_mean = res["kld_sum"] / n
    per_chunk = int(meta["n_ctx"]) - int(meta["n_ctx"]) // 2 - 1
    return {
        "kld_mean": kld_mean,
        "kld_mean_se": bars["kld_mean_se"],
        "kld_median": bars["kld_median"],
        "kld_p99": bars["kld_p99"],
        "kld_p99_9": bars["kld_p99_9"],
        "kld_max": bars["kld_max"],
        "ppl": ppl,
        "ppl_base": ppl_base,
        "ppl_delta_pct": (ppl / ppl_base - 1.0) * 100.0,
        "ppl_ratio": bars["ppl_ratio"],
        "ppl_ratio_se": bars["ppl_ratio_se"],
        "top1_agreement": res["top1_same"] / n,
        "top1_agreement_se": bars["top1_agreement_se"],
        "prompt_tps": res["prompt_tps"],
        "gen_tps": res["gen_tps"],
        "device": res["device"],
        "n_tokens": n,
        "budget": {
            "mode": "all" if budget is None else "auto",
            **(budget.record() if budget is not None else {}),
            "text_tokens": int(meta["n_chunks"]) * per_chunk,
            "stopped": res["stopped"],
            "chunks": res["chunks"],
            # the error between chunks (a passage's context moves its positions together): the rule holds the
            # larger of it and the per-position one (llama-perplexity's, in kld_mean_se / top1_agreement_se)
            "kld_mean_se_chunks": res["kld_mean_se_chunks"],
            "top1_agreement_se_chunks": res["top1_agreement_se_chunks"],
            "kld_rel_se": max(bars["kld_mean_se"], res["kld_mean_se_chunks"] or 0.0) / kld_mean
            if kld_mean > 0
            else None,
        },
    }


# --- the parent side of the worker -----------------------------------------------------------------------------


def _run_worker(role: str, job: dict[str, Any], *, label: str, model: Path, timeout_s: float | None) -> dict[str, Any]:
    try:
        run = run_worker(
            "cecai_converter.fidelity.worker",
            job,
            timeout=timeout_s,
            name=f"fidelity {role}",
            env=runtime_env(int(job["n_gpu_layers"])),
        )
    except WorkerFailed as exc:
        if exc.kind == "timeout":
            raise MeasurementFailed(
                f"fidelity: evaluating {label} ({model.name}) took longer than {timeout_s:g} s; it was stopped",
                hint="evaluate fewer tokens (max_tokens), offload layers to a GPU, or turn fidelity off "
                "(FIDELITY: false)",
            ) from None
        tail = exc.output_tail[-_TAIL_CHARS:].strip()
        raise _as_error(exc.kind, f"fidelity: evaluating {label} ({model}) failed: {exc.reason}", tail, role) from None
    return run.data


def _as_error(kind: str | None, message: str, tail: str, role: str) -> ConverterError:
    if kind == "usage":
        # Only the model's tokenizer can count the text's tokens, so this comes after converting, quantizing and
        # verifying: not "bad input, nothing was converted" (exit 2), but a measurement that could not be made.
        return MeasurementFailed(
            message,
            hint="the files were converted and verified but not delivered: give a longer EVAL_TEXT (a few thousand "
            "words), or turn fidelity off (FIDELITY: false)",
        )
    hint = (
        "the file may be corrupt or use a type this llama-cpp-python build cannot run; run with CECAI_DEBUG=1 "
        "and see the llama.cpp log below"
        if role == "candidate"
        else "the base GGUF could not be evaluated; check that it loads with `cecai-convert verify`"
    )
    return MeasurementFailed(f"{message}\n--- llama.cpp log (tail) ---\n{tail}" if tail else message, hint=hint)
