"""What each quantization cost: KL-divergence, perplexity and top-1 agreement against the base GGUF.

The method follows llama.cpp's ``llama-perplexity --kl-divergence``: the evaluation text is tokenized once (with
BOS when the vocabulary adds one, as the tool does), cut into chunks of ``n_ctx`` tokens (the first token of each
chunk replaced by BOS when the vocabulary adds one), each chunk is evaluated with logits for every position, and
only the second half of each chunk is scored, so every scored token has at least ``n_ctx / 2`` tokens of context.
Over the scored positions:

* ``kld_mean``: mean of the per-token KL(base ‖ candidate) = Σ p_base · (log p_base − log p_candidate), in nats;
  ``kld_mean_se`` its standard error; ``kld_median``, ``kld_p99``, ``kld_p99_9``, ``kld_max``: the median, 99th and
  99.9th percentiles and maximum of the per-token values (the tail is where a quantization breaks);
* ``ppl`` / ``ppl_base``: exp of the mean negative log-likelihood of the actual next token;
* ``ppl_delta_pct``: ``(ppl / ppl_base − 1) · 100``; ``ppl_ratio``: ``ppl / ppl_base`` and ``ppl_ratio_se`` its
  standard error, from the covariance of the two per-token log-likelihood series;
* ``top1_agreement``: the fraction of positions where both models rank the same token first; ``top1_agreement_se``:
  ``sqrt(p (1 − p) / (n − 1))``;
* ``prompt_tps`` / ``gen_tps``: tokens per second of the chunk evaluation (batched) and of greedy one-token
  decoding, on the machine and device that ran it;
* ``device``: ``cuda`` when layers were offloaded to a GPU build, else ``cpu``; ``n_tokens``: scored positions.

The base's log-probabilities are computed once and kept on disk, one float32 file per chunk, so memory stays at one
chunk (``n_ctx × n_vocab``) however large the vocabulary; disk use is ``4 × n_tokens × n_vocab`` bytes, in a
temporary folder removed afterwards, or (:func:`measure_run` with a ``cache_root``) kept between runs under a key of
the base's bytes and the text (:func:`base_cache_key`), so a re-run that adds a precision does not evaluate the base
again. llama.cpp runs in a worker subprocess: a model that makes it abort becomes a :class:`MeasurementFailed`, not a
dead caller.

How many chunks are read: all of them without a :class:`Budget` (as llama-perplexity does); with one, each candidate
stops after the first chunk at which :func:`stop_reason` says its error bars are narrow enough (the KL-divergence
mean's standard error within ``target`` × the mean or :data:`KLD_SE_FLOOR` nats, top-1's within
:data:`TOP1_SE_TARGET`, at least ``min_tokens`` positions). The chunks and scored positions are the same either
way; a budgeted run only reads fewer of them. The base is evaluated as far as some candidate needs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

from .errors import ConfigError, ConverterError, MeasurementFailed, UsageError, WorkerFailed
from .gguf_header import read_header
from .tools import WorkerUsage, run_worker, runtime_env, runtime_name, serve_job

__all__ = [
    "DEFAULT_EVAL_TEXT",
    "DEFAULT_TARGET",
    "KLD_SE_FLOOR",
    "MIN_BUDGET_TOKENS",
    "RESULT_KEYS",
    "THRESHOLD_KEYS",
    "THRESHOLD_RANGES",
    "TOKEN_MODES",
    "TOP1_SE_TARGET",
    "Budget",
    "FidelityRun",
    "MeasurementFailed",
    "base_cache_key",
    "check_target",
    "check_thresholds",
    "default_cache_root",
    "default_eval_text",
    "error_bars",
    "mean_and_se",
    "measure",
    "measure_run",
    "stop_reason",
    "threshold_value",
    "tokens_needed",
    "validate_thresholds",
]

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
#: Threshold names → (result key, whether the result must stay at or below the limit).
THRESHOLD_KEYS: Final[Mapping[str, tuple[str, bool]]] = {
    "max_kld": ("kld_mean", True),
    "max_ppl_delta_pct": ("ppl_delta_pct", True),
    "min_top1": ("top1_agreement", False),
}
#: The one range rule of each limit (here and in ``check --max-kld/--min-top1``), inclusive. Outside it a limit can
#: never be met or always is: a sign slip (``max_kld: -1``) or a percentage for a fraction (``min_top1: 90``).
THRESHOLD_RANGES: Final[Mapping[str, tuple[float, float]]] = {
    "max_kld": (0.0, math.inf),
    "max_ppl_delta_pct": (0.0, math.inf),
    "min_top1": (0.0, 1.0),
}
# Smallest chunk worth scoring: half of it is context.
_MIN_CHUNK: Final = 32
# Greedy decoding used for the generation speed.
_GEN_PROMPT: Final = 16
_GEN_TOKENS: Final = 48
# Rows of a chunk turned into log-probabilities at once (bounds the float64 scratch memory).
_ROW_BLOCK: Final = 64
_TAIL_CHARS: Final = 3000


def default_eval_text() -> Path:
    """The evaluation text that ships with the package."""
    return Path(str(resources.files("cecai_converter") / "data" / DEFAULT_EVAL_TEXT))


#: The error bar fidelity stops at by default: the KL-divergence mean's standard error at 10 % of the mean.
DEFAULT_TARGET: Final = 0.10
#: The smallest target accepted (a hundredth of a percent would read the whole text anyway) and the largest.
TARGET_RANGE: Final = (0.01, 1.0)
#: Near-lossless files (F16, Q8_0: a mean of a few thousandths of a nat or less) stop once the mean's standard error
#: is below this many nats, whatever the ratio: ±0.0005 cannot change a choice between types (llama.cpp's own table
#: has Q8_0 ≈ 0.0014, Q6_K ≈ 0.0055), and a relative target on a mean near 0 would read the whole text for nothing.
KLD_SE_FLOOR: Final = 0.0005
#: Top-1 agreement's standard error at which it stops: ± 2 points.
TOP1_SE_TARGET: Final = 0.02
#: Scored positions read before the rule is asked (two 512-token chunks): a standard error from a handful of
#: positions of one passage is itself unreliable, and top-1's needs a few hundred (p (1 − p) / 0.02²).
MIN_BUDGET_TOKENS: Final = 500
#: ``fidelity_tokens`` values: stop at the target, or score the whole text (as llama-perplexity does).
TOKEN_MODES: Final = ("auto", "all")
#: Base evaluations kept in the cache (each is 4 × tokens × vocabulary bytes: hundreds of MB for a large vocabulary).
_CACHE_KEEP: Final = 4
#: Bumped when the cached files' layout or meaning changes.
_CACHE_VERSION: Final = 1


@dataclass(frozen=True)
class Budget:
    """When to stop evaluating a candidate (see :func:`stop_reason`).

    Attributes:
        target: the KL-divergence mean's standard error, as a fraction of the mean, that is precise enough.
        kld_se_floor: a standard error in nats that is precise enough whatever the mean (near-lossless files).
        top1_se: the top-1 agreement's standard error that is precise enough.
        min_tokens: scored positions read before the rule is asked.
    """

    target: float = DEFAULT_TARGET
    kld_se_floor: float = KLD_SE_FLOOR
    top1_se: float = TOP1_SE_TARGET
    min_tokens: int = MIN_BUDGET_TOKENS

    def record(self) -> dict[str, Any]:
        """The manifest's ``budget`` fields that say what was asked."""
        return {
            "target": self.target,
            "kld_se_floor": self.kld_se_floor,
            "top1_se_max": self.top1_se,
            "min_tokens": self.min_tokens,
        }


def check_target(value: object, where: str, *, error: type[UsageError] = ConfigError) -> float:
    """``value`` as a fidelity target (a fraction within :data:`TARGET_RANGE`), else ``error`` naming ``where``."""
    from .names import show

    low, high = TARGET_RANGE
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(number) and low <= number <= high):
        raise error(
            f"{where} must be a fraction between {low:g} and {high:g}, got {show(value)}",
            hint="0.1: stop when the KL-divergence mean is known to ±10 %; --fidelity-tokens all reads the whole text",
        )
    return number


def mean_and_se(values: ArrayLike) -> tuple[float, float]:
    """A series' mean and its standard error as llama-perplexity computes it: ``sqrt(var / (n − 1))``, 0 for ten
    values or fewer."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    var = float(np.mean((x - mean) ** 2))
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def stop_reason(kld: ArrayLike, top1_same: ArrayLike, budget: Budget) -> str | None:
    """Whether the positions scored so far are enough: ``"target"`` when they are, else None.

    Enough means at least ``budget.min_tokens`` positions, a KL-divergence mean whose standard error is at most
    ``budget.target`` × the mean or at most ``budget.kld_se_floor`` nats, and a top-1 agreement whose standard
    error (``sqrt(p (1 − p) / (n − 1))``) is at most ``budget.top1_se``. The errors are the ones reported
    (:func:`error_bars`), so the manifest shows the precision the rule stopped at.

    Args:
        kld: KL(base ‖ candidate) of each position scored so far, in order.
        top1_same: for each of those positions, whether both models rank the same token first (bools or 0/1).
        budget: the rule.
    """
    import numpy as np

    flags = np.asarray(top1_same, dtype=np.float64)
    n = int(flags.size)
    if n < max(budget.min_tokens, 12) or np.asarray(kld).size != n:
        return None
    mean, se = mean_and_se(kld)
    if not (math.isfinite(mean) and math.isfinite(se)):
        return None
    p = float(flags.mean())
    top1_se = math.sqrt(p * (1.0 - p) / (n - 1))
    kld_ok = se <= budget.kld_se_floor or se <= budget.target * abs(mean)
    return "target" if kld_ok and top1_se <= budget.top1_se else None


def tokens_needed(kld: ArrayLike, top1_same: ArrayLike, budget: Budget) -> int:
    """How many positions the rule will likely need, from those scored so far: a standard error shrinks as
    ``1 / sqrt(n)``, so ``n × (se / allowed)²`` for the KL-divergence and ``p (1 − p) / top1_se² + 1`` for top-1, at
    least ``budget.min_tokens``. What the base is evaluated up to when a candidate asks for more (an estimate:
    the rule itself decides, chunk by chunk)."""
    import numpy as np

    flags = np.asarray(top1_same, dtype=np.float64)
    n = int(flags.size)
    need = float(budget.min_tokens)
    if n > 10:
        mean, se = mean_and_se(kld)
        allowed = max(budget.kld_se_floor, budget.target * abs(mean))
        if math.isfinite(se) and se > 0:
            need = max(need, n * (se / allowed) ** 2 if allowed > 0 else math.inf)
        p = float(flags.mean())
        if budget.top1_se > 0:
            need = max(need, p * (1.0 - p) / budget.top1_se**2 + 1)
        elif 0.0 < p < 1.0:
            need = math.inf
    return int(min(need, 2**31 - 1))


def base_cache_key(base_sha256: str, text: Path, *, n_ctx: int, max_tokens: int) -> str:
    """What a base evaluation depends on: the base's bytes, the text's bytes, the chunk length and the tokens read
    (so the scored positions), and this code's layout of the cached files."""
    import hashlib

    from .fsutil import sha256_file
    from .toolchain import LLAMA_CPP_PYTHON_VERSION

    parts = {
        "version": _CACHE_VERSION,
        "base": base_sha256,
        "text": sha256_file(text),
        "n_ctx": n_ctx,
        "max_tokens": max_tokens,
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def default_cache_root() -> Path:
    """Where base evaluations are kept between runs: ``$XDG_CACHE_HOME/cecai-converter/fidelity`` (as the Hub
    downloads are), so a re-run that adds a precision reuses the base's log-probabilities."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cecai-converter" / "fidelity"


def _prune_cache(root: Path, keep: Path) -> None:
    """Keep the :data:`_CACHE_KEEP` most recently used base evaluations in ``root`` (``keep`` among them)."""
    import shutil

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another run's pruning
            return 0.0

    try:
        entries = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    entries.sort(key=lambda p: (p == keep, used(p)), reverse=True)
    for old in entries[_CACHE_KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def _cached_chunks(work: Path) -> tuple[dict[str, Any] | None, int]:
    """The cached base evaluation's facts and how many chunks of it are on disk (0, 1, … in order)."""
    try:
        meta = json.loads((work / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, 0
    sizes = [meta.get(k) for k in ("n_ctx", "n_vocab", "n_chunks")] if isinstance(meta, dict) else []
    ok = len(sizes) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
    if not ok or meta.get("version") != _CACHE_VERSION:  # damaged or of another layout: made again
        return None, 0
    ready = 0
    while (
        ready < int(meta.get("n_chunks", 0))
        and (work / f"base-{ready}.npy").is_file()
        and (work / f"base-nll-{ready}.npy").is_file()
    ):
        ready += 1
    return meta, ready


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
    from .texts import MAX_TEXT_TOKENS

    # The work stays bounded whatever the text: at most MAX_TEXT_TOKENS are scored (a 5 MB text ran for minutes).
    max_tokens = MAX_TEXT_TOKENS if max_tokens is None else min(max_tokens, MAX_TEXT_TOKENS)

    common = {"n_threads": n_threads, "n_gpu_layers": n_gpu_layers}
    run = FidelityRun()
    with tempfile.TemporaryDirectory(prefix="cecai-fidelity-") as tmp:
        if cache_root is None:
            work = Path(tmp) / "base"
        else:
            from .fsutil import refuse_symlink, sha256_file

            key = base_cache_key(base_sha256 or sha256_file(Path(base)), text_path, n_ctx=n_ctx, max_tokens=max_tokens)
            work = Path(cache_root) / key[:40]
            # the worker writes the base's files in it: never through a link planted at its name
            refuse_symlink(work, why="refusing to write the base's cached evaluation through it",
                           hint=f"remove {work} (fidelity's cache; it is rebuilt)")  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        os.utime(work)  # most recently used: the last one pruned
        meta, ready = _cached_chunks(work)

        def ensure_base(want_tokens: int | None) -> None:
            """Have the base's first chunks on disk, enough for ``want_tokens`` scored positions (None: all)."""
            nonlocal meta, ready
            if meta is not None:
                per_chunk = int(meta["n_ctx"]) - int(meta["n_ctx"]) // 2 - 1
                total = int(meta["n_chunks"])
                need = total if want_tokens is None else min(total, -(-want_tokens // per_chunk))
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
            "kld_rel_se": bars["kld_mean_se"] / kld_mean if kld_mean > 0 else None,
        },
    }


def validate_thresholds(thresholds: object, where: str = "THRESHOLDS") -> dict[str, dict[str, float]]:
    """Check a ``THRESHOLDS`` value and return it keyed by canonical precision names (``q4_k_m`` → ``Q4_K_M``).

    The configuration calls this when it is read, so a mistake is reported before anything is converted, with
    fidelity on or off.

    A ``source`` entry holds the limits of the comparison with the source model (``max_nmse``, ``max_kld``,
    ``min_top1``; :func:`cecai_converter.source_parity.validate_limits`), kept under ``source``.

    Raises:
        ConfigError: not a mapping; an unknown precision; limits that are not a mapping; an unknown limit name; a
            limit that is not a finite number.
    """
    from .names import show
    from .precisions import parse_precision

    example = "e.g. THRESHOLDS: {Q4_K_M: {max_kld: 0.1, max_ppl_delta_pct: 5}}"
    if thresholds is None:
        return {}
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"{where}: expected a mapping PRECISION -> limits, got {show(thresholds)}", hint=example)
    checked: dict[str, dict[str, float]] = {}
    for precision, limits in thresholds.items():
        if isinstance(precision, str) and precision.lower() == "source":  # the base against its source model
            from .source_parity import validate_limits

            checked["source"] = validate_limits(limits, where)
            continue
        info = parse_precision(precision, where=where)
        if not isinstance(limits, Mapping):
            raise ConfigError(f"{where}: {info.name}: expected a mapping of limits, got {show(limits)}", hint=example)
        checked[info.name] = {}
        for name, limit in limits.items():
            if name not in THRESHOLD_KEYS:
                raise ConfigError(
                    f"{where}: {info.name}: unknown limit {show(name)}",
                    hint=f"known limits: {', '.join(THRESHOLD_KEYS)}",
                )
            checked[info.name][name] = threshold_value(name, limit, f"{where}: {info.name}.{name}")
    return checked


def threshold_value(name: str, value: object, where: str, *, error: type[UsageError] = ConfigError) -> float:
    """``value`` as the limit ``name`` (a key of :data:`THRESHOLD_RANGES`), range-checked, else ``error`` at ``where``.

    Args:
        name: ``max_kld``, ``max_ppl_delta_pct`` or ``min_top1``.
        value: the candidate, straight from YAML, JSON or a flag.
        where: what the user wrote it in (``THRESHOLDS in …: Q4_K_M.max_kld``, ``--min-top1``).
        error: the kind (exit 2 for both).
    """
    from .names import show

    low, high = THRESHOLD_RANGES[name]
    rule = f"between {low:g} and {high:g}" if math.isfinite(high) else f"a number ≥ {low:g}"
    number = math.nan
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        hint = "min_top1 is a fraction (0.9 for 90%)" if name == "min_top1" else f"{name} is a limit, never negative"
        raise error(f"{where} must be {rule}, got {show(value)}", hint=hint)
    return number


def check_thresholds(
    results: Mapping[str, Mapping[str, Any]], thresholds: Mapping[str, Mapping[str, float]]
) -> list[str]:
    """Compare results with per-precision limits; return one message per breach (empty: all within limits).

    ``thresholds`` maps a precision (as in ``results``, case-insensitive) to limits ``max_kld``,
    ``max_ppl_delta_pct`` and ``min_top1``. A precision with limits but no result is skipped (it was not
    produced); a non-finite measurement breaches every limit set for it.

    Raises:
        ConfigError: an unknown limit name or a value that is not a number.
    """
    by_upper = {label.upper(): label for label in results}
    violations: list[str] = []
    for precision, limits in validate_thresholds(thresholds).items():
        label = by_upper.get(precision.upper())
        for name, limit in limits.items():
            if label is None:
                continue
            key, is_max = THRESHOLD_KEYS[name]
            value = results[label].get(key)
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if isinstance(value, (int, float)) and finite and (value <= limit if is_max else value >= limit):
                continue
            shown = f"{value:.6g}" if finite else repr(value)
            relation = "above the maximum" if is_max else "below the minimum"
            violations.append(f"{label}: {key} = {shown} is {relation} {name} = {limit:g}")
    return violations


def error_bars(kld: ArrayLike, nll: ArrayLike, nll_base: ArrayLike, n_same_top: int) -> dict[str, float]:
    """The statistics ``llama-perplexity --kl-divergence`` prints, from per-token values.

    Args:
        kld: KL(base ‖ candidate) of each scored token, in nats.
        nll, nll_base: the candidate's and the base's negative log-likelihood of each scored token's actual next
            token (same positions, same order).
        n_same_top: how many of the positions both models rank the same token first.

    Returns:
        ``kld_mean`` ± ``kld_mean_se``, ``kld_median``, ``kld_p99``, ``kld_p99_9``, ``kld_max``, ``ppl_ratio`` ±
        ``ppl_ratio_se`` and ``top1_agreement`` ± ``top1_agreement_se``, computed as tools/perplexity/perplexity.cpp
        does: a mean's standard error is ``sqrt(var / (n − 1))`` (0 for ten tokens or fewer), percentiles
        interpolate linearly at ``fraction × (n − 1)`` of the sorted values, the top-1 error is
        ``sqrt(p (1 − p) / (n − 1))``, and ``ln(PPL(Q)/PPL(base))`` gets its error from both series' errors and
        their covariance (the two models' losses on a token go together, so the ratio is far surer than either
        perplexity); ``ppl_ratio_se`` is ``ppl_ratio × `` that error.

    Raises:
        ValueError: no tokens, or series of different lengths.
    """
    import numpy as np

    k = np.asarray(kld, dtype=np.float64)
    a = np.asarray(nll, dtype=np.float64)
    b = np.asarray(nll_base, dtype=np.float64)
    n = int(k.size)
    if n == 0 or a.size != n or b.size != n:
        raise ValueError(f"error_bars: expected three series of one length > 0, got {n}, {a.size}, {b.size}")

    def mean_se(x: Any) -> tuple[float, float]:
        mean = float(x.mean())
        var = float(np.mean((x - mean) ** 2))  # = sum2/n - mean² (perplexity.cpp), without the cancellation
        return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)

    kld_mean, kld_se = mean_se(k)
    ordered = np.sort(k)
    log_ppl, log_ppl_se = mean_se(a)
    log_base, log_base_se = mean_se(b)
    cov = float(np.mean((a - log_ppl) * (b - log_base))) / (n - 1) if n >= 10 else 0.0
    log_ratio_se = math.sqrt(max(log_ppl_se**2 + log_base_se**2 - 2.0 * cov, 0.0))
    ratio = math.exp(log_ppl - log_base)
    same = n_same_top / n
    return {
        "kld_mean": kld_mean,
        "kld_mean_se": kld_se,
        "kld_median": float(np.median(ordered)),
        "kld_p99": float(np.percentile(ordered, 99.0)),
        "kld_p99_9": float(np.percentile(ordered, 99.9)),
        "kld_max": float(ordered[-1]),
        "ppl_ratio": ratio,
        "ppl_ratio_se": ratio * log_ratio_se,
        "top1_agreement": same,
        "top1_agreement_se": math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0,
    }


# --- the parent side of the worker -----------------------------------------------------------------------------


def _run_worker(role: str, job: dict[str, Any], *, label: str, model: Path, timeout_s: float | None) -> dict[str, Any]:
    try:
        run = run_worker(
            "cecai_converter.fidelity",
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


# --- the worker (a separate process: llama.cpp may abort) -------------------------------------------------------


def _evaluate(job: Mapping[str, Any]) -> dict[str, Any]:
    return _evaluate_base(job) if job["role"] == "base" else _evaluate_candidate(job)


def _load(job: Mapping[str, Any], n_ctx: int) -> Any:
    import llama_cpp  # the worker alone needs the runtime

    kwargs: dict[str, Any] = {
        "model_path": job["model"],
        "n_ctx": n_ctx,
        "n_batch": n_ctx,
        "n_ubatch": min(n_ctx, 512),
        "logits_all": True,
        "n_gpu_layers": int(job["n_gpu_layers"]),
        "verbose": True,
        "seed": 0,
    }
    if job.get("n_threads"):
        kwargs["n_threads"] = int(job["n_threads"])
        kwargs["n_threads_batch"] = int(job["n_threads"])
    return llama_cpp.Llama(**kwargs)


def _chunks(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    out = []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        chunk = list(tokens[start : start + n_ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def log_softmax_rows(logits: Any) -> Any:
    """Row-wise log-softmax in float64 blocks, returned as float32 (n_rows × n_vocab)."""
    import numpy as np

    out = np.empty(logits.shape, dtype=np.float32)
    for i in range(0, logits.shape[0], _ROW_BLOCK):
        block = logits[i : i + _ROW_BLOCK].astype(np.float64)
        block -= block.max(axis=1, keepdims=True)
        block -= np.log(np.exp(block).sum(axis=1, keepdims=True))
        out[i : i + _ROW_BLOCK] = block
    return out


def _eval_chunk(llm: Any, chunk: list[int]) -> tuple[Any, float]:
    """Evaluate one chunk; return the log-probs of the scored rows (those predicting tokens n_ctx/2+1 … end)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(chunk)
    elapsed = time.perf_counter() - start
    first = len(chunk) // 2
    logits = llm.scores[first : len(chunk) - 1]
    return log_softmax_rows(logits), elapsed


def generation_speed(llm: Any, tokens: list[int], bos: int | None) -> float:
    """Tokens per second of greedy one-token decoding after a short prompt from ``tokens``."""
    import numpy as np

    prompt = ([bos] if bos is not None else []) + list(tokens[:_GEN_PROMPT])
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(_GEN_TOKENS):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    return _GEN_TOKENS / (time.perf_counter() - start)


def bos_token(llm: Any) -> int | None:
    """The BOS token a prompt starts with for this model's vocabulary, or None when it adds none."""
    model = llm._model  # llama-cpp-python's internal model wrapper: the one place add_bos is exposed
    return int(model.token_bos()) if model.add_bos_token() and model.token_bos() >= 0 else None


def _save(path: Path, array: Any) -> None:
    """``np.save`` through a temporary and a rename: a reader (another run on the same cache) never sees half."""
    import numpy as np

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _evaluate_base(job: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate the base's chunks that are not on disk yet, up to ``want_tokens`` scored positions (null: all)."""
    import numpy as np

    work = Path(job["work"])
    meta, ready = _cached_chunks(work)
    if meta is None:
        try:
            text = Path(job["text"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise WorkerUsage(f"cannot read the evaluation text {job['text']}: {exc}") from None
        if job.get("max_tokens"):
            # Tokenize only what can be scored: a token is rarely 64 characters (a text of long runs gives fewer).
            text = text[: 64 * int(job["max_tokens"])]
        # One load in the common case: the context length comes from the header. (A vocabulary-only load followed
        # by a full one in this process ended in SIGSEGV during the second load on a CUDA build; the cause was not
        # isolated, and one load is faster anyway.)
        header = read_header(Path(job["model"]))
        arch = header.metadata.get("general.architecture", "")
        n_ctx_train = int(header.metadata.get(f"{arch}.context_length", 0) or 0)
        n_ctx = min(int(job["n_ctx"]), n_ctx_train) if n_ctx_train > 0 else int(job["n_ctx"])
        llm = _load(job, n_ctx)
        # BOS as llama-perplexity's common_tokenize(ctx, text, add_special=true): the same chunk boundaries
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if job.get("max_tokens"):
            tokens = tokens[: int(job["max_tokens"])]
        if len(tokens) < n_ctx:
            if len(tokens) < 2 * _MIN_CHUNK:
                raise WorkerUsage(
                    f"the evaluation text has only {len(tokens)} tokens; at least {2 * _MIN_CHUNK} are needed"
                )
            n_ctx = len(tokens)  # a short text: one chunk of all of it
            llm.close()
            llm = _load(job, n_ctx)
        bos = bos_token(llm)
        chunks = _chunks(tokens, n_ctx, bos)
        _save(work / "tokens.npy", np.asarray(tokens, dtype=np.int32))
        meta = {"version": _CACHE_VERSION, "n_ctx": n_ctx, "n_vocab": int(llm.n_vocab()), "n_chunks": len(chunks)}
        tmp = work / f".meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, work / "meta.json")
        ready = 0
    else:
        n_ctx = int(meta["n_ctx"])
        llm = _load(job, n_ctx)
        bos = bos_token(llm)
        chunks = _chunks(np.load(work / "tokens.npy").tolist(), n_ctx, bos)
    per_chunk = n_ctx - n_ctx // 2 - 1
    want = job.get("want_tokens")
    need = len(chunks) if want is None else min(len(chunks), -(-int(want) // per_chunk))
    evaluated = 0
    for i in range(ready, need):
        logp, _ = _eval_chunk(llm, chunks[i])
        targets = np.asarray(chunks[i][n_ctx // 2 + 1 :], dtype=np.int64)
        _save(work / f"base-{i}.npy", logp)
        # n_tokens floats: the base's losses, for the perplexity ratio and its error
        _save(work / f"base-nll-{i}.npy", -logp[np.arange(len(targets)), targets].astype(np.float64))
        evaluated += len(targets)
    return {"n_ctx": n_ctx, "n_chunks": len(chunks), "evaluated_tokens": evaluated}


def _reference_rows(llm: Any, chunk: list[int], n_positions: int) -> dict[str, Any]:
    """agreement.py's reference rows (top-k ids and log-probabilities) of a chunk's first positions, from the
    evaluation that just ran on it (the same positions a check on another runtime evaluates)."""
    import numpy as np

    from .agreement import TOP_K

    logp = log_softmax_rows(llm.scores[:n_positions])
    k = min(TOP_K, logp.shape[1])
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    lps = np.take_along_axis(logp, ids, axis=1)
    return {
        "tokens": [int(t) for t in chunk[:n_positions]],
        "ids": ids.astype(int).tolist(),
        "logprobs": [[round(float(v), 6) for v in row] for row in lps],
    }


def _evaluate_candidate(job: Mapping[str, Any]) -> dict[str, Any]:
    """Score the candidate on the base's chunks on disk, going on from where an earlier round of it stopped.

    Replies ``{"status": "more"}`` (its per-position values kept in ``state``) when the base's chunks ran out
    before the budget was met and the text has more; else the measurement.
    """
    import numpy as np

    work, state = Path(job["work"]), Path(job["state"])
    n_ctx = int(job["n_ctx"])
    tokens = np.load(work / "tokens.npy").tolist()
    llm = _load(job, n_ctx)
    if int(llm.n_vocab()) != int(job["n_vocab"]):
        raise WorkerUsage(
            f"the vocabulary differs from the base's ({llm.n_vocab()} vs {job['n_vocab']} tokens): "
            "not a quantization of the same model"
        )
    bos = bos_token(llm)
    chunks = _chunks(tokens, n_ctx, bos)
    budget = Budget(**job["budget"]) if job.get("budget") else None
    # Per-position values (n_tokens floats each), for the percentiles, the standard errors and the stopping rule.
    kld, nll, same, eval_s, start = np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool), 0.0, 0
    if (state / "kld.npy").is_file():
        kld, nll, same = (np.load(state / f"{name}.npy") for name in ("kld", "nll", "same"))
        progress = json.loads((state / "progress.json").read_text(encoding="utf-8"))
        start, eval_s = int(progress["next"]), float(progress["eval_s"])
    reply: dict[str, Any] = {}
    if job.get("verify") and start == 0:  # the load that measures the file verifies it too (verify.py's check)
        from .verify import generate_check

        reply["verification"] = generate_check(llm, int(job["n_gpu_layers"]))
    stopped: str | None = None
    done = start
    for i in range(start, int(job["chunks_ready"])):
        logq, elapsed = _eval_chunk(llm, chunks[i])
        if i == 0 and int(job.get("reference_positions") or 0) > 0:
            reply["reference"] = _reference_rows(llm, chunks[0], int(job["reference_positions"]))
        eval_s += elapsed
        logp = np.load(work / f"base-{i}.npy")
        targets = np.asarray(chunks[i][n_ctx // 2 + 1 :], dtype=np.int64)
        parts = []
        for r in range(0, logp.shape[0], _ROW_BLOCK):
            p_block = logp[r : r + _ROW_BLOCK].astype(np.float64)
            q_block = logq[r : r + _ROW_BLOCK].astype(np.float64)
            parts.append((np.exp(p_block) * (p_block - q_block)).sum(axis=1))
        kld = np.concatenate([kld, *parts])
        nll = np.concatenate([nll, -logq[np.arange(len(targets)), targets].astype(np.float64)])
        same = np.concatenate([same, logp.argmax(axis=1) == logq.argmax(axis=1)])
        done = i + 1
        if budget is not None:
            stopped = stop_reason(kld, same, budget)
            if stopped is not None:
                break
    if stopped is None:
        if done < int(job["n_chunks"]):
            state.mkdir(parents=True, exist_ok=True)
            for name, values in (("kld", kld), ("nll", nll), ("same", same)):
                np.save(state / f"{name}.npy", values)
            (state / "progress.json").write_text(json.dumps({"next": done, "eval_s": eval_s}), encoding="utf-8")
            return {**reply, "status": "more", "need_tokens": tokens_needed(kld, same, budget) if budget else None}
        stopped = "all" if budget is None else "text_end"
    kld_sum, nll_sum = float(kld.sum()), float(nll.sum())
    if not math.isfinite(kld_sum) or not math.isfinite(nll_sum):
        raise RuntimeError("the model produced non-finite logits (NaN or inf): the quantized weights are broken")
    nll_base = np.concatenate([np.load(work / f"base-nll-{i}.npy") for i in range(done)])
    top1_same = int(same.sum())
    gen_tokens = tokens[1:] if bos is not None and tokens and tokens[0] == bos else tokens  # no double BOS
    return {
        **reply,
        "status": "done",
        "stopped": stopped,
        "kld_sum": kld_sum,
        "nll_sum": nll_sum,
        "nll_base_sum": float(nll_base.sum()),
        "top1_same": top1_same,
        "n_tokens": int(kld.size),
        "error_bars": error_bars(kld, nll, nll_base, top1_same),
        "prompt_tps": n_ctx * done / eval_s if eval_s > 0 else math.inf,
        "gen_tps": generation_speed(llm, gen_tokens, bos),
        "device": runtime_name(int(job["n_gpu_layers"])),
    }


def _main(argv: list[str] | None = None) -> int:
    return serve_job(_evaluate, argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(_main())
