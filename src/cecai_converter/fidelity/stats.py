"""The statistics ``llama-perplexity --kl-divergence`` prints (:func:`error_bars`), a series' mean and standard error
as it computes them (:func:`mean_and_se`), and the standard error between chunks (:func:`chunk_se`) that the budget
rule also holds."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

# numpy is imported inside the functions (slow to import): the CLI reads this package's limits and starts without it.


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


def chunk_se(values: ArrayLike, per_chunk: int) -> float | None:
    """The standard error of a mean over whole chunks, from the spread of the chunks' own means:
    ``sd(chunk means) / sqrt(chunks)``; None for fewer than two chunks.

    Unlike the per-position error (llama-perplexity's), it holds what a passage's context does to all of its
    positions at once, so a mean over a few chunks is not claimed surer than it is.
    """
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    k = int(x.size) // per_chunk if per_chunk > 0 else 0
    if k < 2:
        return None
    means = x[: k * per_chunk].reshape(k, per_chunk).mean(axis=1)
    return float(means.std(ddof=1) / math.sqrt(k))


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
