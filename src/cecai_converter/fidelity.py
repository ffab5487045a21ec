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
temporary folder removed afterwards. llama.cpp runs in a worker subprocess: a model that makes it abort becomes a
:class:`MeasurementFailed`, not a dead caller.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
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
    "RESULT_KEYS",
    "THRESHOLD_KEYS",
    "THRESHOLD_RANGES",
    "MeasurementFailed",
    "check_thresholds",
    "default_eval_text",
    "error_bars",
    "measure",
    "threshold_value",
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

    Returns:
        label → a dict with the keys of :data:`RESULT_KEYS` (see the module docstring), in the order of
        ``candidates``.

    Raises:
        UsageError: a file is missing or the text is unreadable or too short.
        MeasurementFailed: llama.cpp failed or crashed on a model; the message names it and keeps its log tail.
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
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cecai-fidelity-") as tmp:
        work = Path(tmp)
        base_info = _run_worker(
            "base",
            {
                **common,
                "role": "base",
                "model": str(base),
                "work": str(work),
                "text": str(text_path),
                "n_ctx": n_ctx,
                "max_tokens": max_tokens,
            },
            label="base",
            model=Path(base),
            timeout_s=timeout_s,
        )
        for label, path in candidates.items():
            res = _run_worker(
                "candidate",
                {
                    **common,
                    "role": "candidate",
                    "model": str(path),
                    "work": str(work),
                    "n_ctx": base_info["n_ctx"],
                    "n_vocab": base_info["n_vocab"],
                },
                label=label,
                model=Path(path),
                timeout_s=timeout_s,
            )
            ppl = math.exp(res["nll_sum"] / res["n_tokens"])
            ppl_base = math.exp(base_info["nll_sum"] / base_info["n_tokens"])
            bars = res["error_bars"]
            results[label] = {
                "kld_mean": res["kld_sum"] / res["n_tokens"],
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
                "top1_agreement": res["top1_same"] / res["n_tokens"],
                "top1_agreement_se": bars["top1_agreement_se"],
                "prompt_tps": res["prompt_tps"],
                "gen_tps": res["gen_tps"],
                "device": res["device"],
                "n_tokens": res["n_tokens"],
            }
    return results


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


def _evaluate_base(job: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    work = Path(job["work"])
    try:
        text = Path(job["text"]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkerUsage(f"cannot read the evaluation text {job['text']}: {exc}") from None
    if job.get("max_tokens"):
        # Tokenize only what can be scored: a token is rarely 64 characters (a text of long runs gives fewer).
        text = text[: 64 * int(job["max_tokens"])]
    # One load in the common case: the context length comes from the header. (A vocabulary-only load followed by
    # a full one in this process ended in SIGSEGV during the second load on a CUDA build; the cause was not
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
    np.save(work / "tokens.npy", np.asarray(tokens, dtype=np.int32))
    nll_sum, n_scored, eval_s = 0.0, 0, 0.0
    nll_tokens = []
    for i, chunk in enumerate(chunks):
        logp, elapsed = _eval_chunk(llm, chunk)
        eval_s += elapsed
        targets = np.asarray(chunk[n_ctx // 2 + 1 :], dtype=np.int64)
        nll_tokens.append(-logp[np.arange(len(targets)), targets].astype(np.float64))
        nll_sum += float(nll_tokens[-1].sum())
        n_scored += len(targets)
        np.save(work / f"base-{i}.npy", logp)
    np.save(work / "base-nll.npy", np.concatenate(nll_tokens))  # n_tokens floats: for the ratio's error
    return {
        "n_ctx": n_ctx,
        "n_vocab": int(llm.n_vocab()),
        "n_chunks": len(chunks),
        "nll_sum": nll_sum,
        "n_tokens": n_scored,
        "prompt_tps": n_ctx * len(chunks) / eval_s,
        "device": runtime_name(int(job["n_gpu_layers"])),
    }


def _evaluate_candidate(job: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    work = Path(job["work"])
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
    top1_same, eval_s = 0, 0.0
    # Per-token values (n_tokens floats each), for the percentiles and the standard errors.
    kld_tokens, nll_tokens = [], []
    for i, chunk in enumerate(chunks):
        logq, elapsed = _eval_chunk(llm, chunk)
        eval_s += elapsed
        logp = np.load(work / f"base-{i}.npy")
        targets = np.asarray(chunk[n_ctx // 2 + 1 :], dtype=np.int64)
        for r in range(0, logp.shape[0], _ROW_BLOCK):
            p_block = logp[r : r + _ROW_BLOCK].astype(np.float64)
            q_block = logq[r : r + _ROW_BLOCK].astype(np.float64)
            kld_tokens.append((np.exp(p_block) * (p_block - q_block)).sum(axis=1))
        nll_tokens.append(-logq[np.arange(len(targets)), targets].astype(np.float64))
        top1_same += int((logp.argmax(axis=1) == logq.argmax(axis=1)).sum())
    kld = np.concatenate(kld_tokens)
    nll = np.concatenate(nll_tokens)
    kld_sum, nll_sum = float(kld.sum()), float(nll.sum())
    if not math.isfinite(kld_sum) or not math.isfinite(nll_sum):
        raise RuntimeError("the model produced non-finite logits (NaN or inf): the quantized weights are broken")
    gen_tokens = tokens[1:] if bos is not None and tokens and tokens[0] == bos else tokens  # no double BOS
    return {
        "kld_sum": kld_sum,
        "nll_sum": nll_sum,
        "top1_same": top1_same,
        "n_tokens": int(kld.size),
        "error_bars": error_bars(kld, nll, np.load(work / "base-nll.npy"), top1_same),
        "prompt_tps": n_ctx * len(chunks) / eval_s,
        "gen_tps": generation_speed(llm, gen_tokens, bos),
        "device": runtime_name(int(job["n_gpu_layers"])),
    }


def _main(argv: list[str] | None = None) -> int:
    return serve_job(_evaluate, argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(_main())
