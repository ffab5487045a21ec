"""The logits compared: NMSE as llama.cpp's ``check-nmse.py`` computes it (and its rating), KL(source ‖ GGUF) per
position with its standard error, top-1 agreement; the record's ``logits`` section, held to the limits."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..fidelity import log_softmax_rows
from ..parity_limits import EXCELLENT_NMSE, LIMIT_KEYS, MAX_NMSE

#: Tokens of the evaluation text the logits are compared on.
N_TOKENS: Final = 128


def nmse(reference: Any, test: Any) -> float:
    """llama.cpp's ``check-nmse.py``: the mean squared error over every value, divided by the variance of the
    reference (0 for identical arrays; infinite for a difference from a constant reference)."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    diff = np.asarray(test, dtype=np.float64) - ref
    mse = float(np.mean(diff * diff))
    var = float(np.var(ref))
    if var == 0.0:
        return math.inf if mse > 0 else 0.0
    return mse / var


def rating(value: float) -> str:
    """llama.cpp's words for an NMSE (``check-nmse.py``'s interpretation)."""
    for limit, words in ((0.0, "perfect"), (1e-6, "essentially identical"), (EXCELLENT_NMSE, "excellent"),
                         (1e-3, "very good"), (MAX_NMSE, "good"), (0.1, "acceptable"), (1.0, "poor")):  # fmt: skip
        if value < limit or (limit == 0.0 and value == 0.0):
            return words
    return "very poor"


#: In the work folder: each side's logits (positions × vocabulary, float32).
SOURCE_LOGITS: Final = "source-logits.npy"
GGUF_LOGITS: Final = "gguf-logits.npy"


def compare_saved_logits(work: Path, n_tokens: int) -> dict[str, Any]:
    """Both sides' logits, as their workers saved them, compared (:func:`_compare_logits`)."""
    import numpy as np

    reference = np.load(work / SOURCE_LOGITS)[:n_tokens]
    ours = np.load(work / GGUF_LOGITS)[:n_tokens]
    return _compare_logits(reference, ours)


def _compare_logits(reference: Any, test: Any) -> dict[str, Any]:
    """NMSE, KL(source ‖ GGUF) per position (mean, standard error), top-1 agreement, largest difference."""
    import numpy as np

    if reference.shape != test.shape:
        return {
            "vocab_mismatch": f"the logits have other shapes: source {list(reference.shape)}, GGUF "
            f"{list(test.shape)} (positions × vocabulary): the vocabularies differ in size",
            "nmse": math.inf, "kld_mean": math.inf, "kld_mean_se": 0.0, "top1_agreement": 0.0,
            "n_tokens": int(reference.shape[0]), "n_vocab": int(test.shape[1]),
        }  # fmt: skip

    logp = log_softmax_rows(reference).astype(np.float64)
    logq = log_softmax_rows(test).astype(np.float64)
    kld = (np.exp(logp) * (logp - logq)).sum(axis=1)
    n = int(kld.size)
    mean = float(kld.mean())
    se = math.sqrt(float(np.var(kld)) / (n - 1)) if n > 1 else 0.0
    return {
        "nmse": nmse(reference, test),
        "max_abs_diff": float(np.abs(reference.astype(np.float64) - test).max()),
        "kld_mean": mean,
        "kld_mean_se": se,
        "top1_agreement": float((reference.argmax(axis=1) == test.argmax(axis=1)).mean()),
        "n_tokens": n,
        "n_vocab": int(reference.shape[1]),
    }


def logits_record(
    ggf: Mapping[str, Any],
    reason: str | None,
    limits: Mapping[str, float],
    remote: str | None,
    trust_remote_code: bool,
    failures: list[str],
) -> dict[str, Any]:
    """The record's ``logits`` section (skipped with ``reason``, or the numbers held to ``limits``); each failure
    appended to ``failures``."""
    if reason is not None:
        return {"status": "skipped", "reason": reason, "limits": dict(limits)}
    numbers = ggf["logits"]
    record = {"status": "compared", **numbers, "rating": rating(numbers["nmse"]), "limits": dict(limits),
              "device": "cpu", "source_dtype": "float32",
              "remote_code": bool(remote) and trust_remote_code}  # fmt: skip
    if numbers.get("vocab_mismatch"):
        failures.append(str(numbers["vocab_mismatch"]))
        return record
    for name, limit in limits.items():
        key, is_max = LIMIT_KEYS[name]
        value = numbers.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            failures.append(f"the logits could not be compared: {key} = {value!r}")
            continue
        if (value >= limit) if is_max else (value < limit):
            relation = "at or above the limit" if is_max else "below the limit"
            failures.append(
                f"the GGUF's logits differ from the source's: {key} {value:.3g} is {relation} {name} = {limit:g} "
                f"(NMSE {numbers['nmse']:.3g}, KLD {numbers['kld_mean']:.3g}, top-1 "
                f"{100 * numbers['top1_agreement']:.1f}% over {numbers['n_tokens']} tokens)"
            )
    return record
