"""How many chunks are read: the token budget set by the error bar.

How many chunks are read: all of them without a :class:`Budget` (as llama-perplexity does); with one, each candidate
stops after the first chunk at which :func:`stop_reason` says its error bars are narrow enough (the KL-divergence
mean's standard error within ``target`` × the mean or :data:`KLD_SE_FLOOR` nats, top-1's within
:data:`TOP1_SE_TARGET`, at least ``min_tokens`` positions and ``min_chunks`` chunks). The errors the rule holds are
the larger of llama-perplexity's per-position ones and the ones between chunks (:func:`chunk_se`), and chunks are
read in an order spread across the text (:func:`spread_order`), so a budgeted mean stays within its error bar of the
whole text's. The chunks and scored positions are the same either way; a budgeted run only reads fewer of them. The
base is evaluated as far as some candidate needs it. ``kld_mean_se`` and ``top1_agreement_se`` stay
llama-perplexity's; ``budget.kld_mean_se_chunks`` and ``budget.top1_agreement_se_chunks`` are the errors between
chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConfigError, UsageError
from ..names import show
from .stats import chunk_se, mean_and_se

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

# numpy is imported inside the functions (slow to import): the CLI reads this package's limits and starts without it.

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
#: Chunks (passages of the text) read before the rule is asked. A passage's context moves all of its positions
#: together: on a tiny Llama, the first two chunks' mean KL-divergence was 9 to 30 of its per-position standard
#: errors away from the whole text's (Q8_0, Q4_K_M), while the chunk means' own spread explained the gap. So the rule
#: also holds the error measured between chunks (:func:`chunk_se`), which needs a few of them, taken across the text
#: (:func:`spread_order`).
MIN_BUDGET_CHUNKS: Final = 4
#: ``fidelity_tokens`` values: stop at the target, or score the whole text (as llama-perplexity does).
TOKEN_MODES: Final = ("auto", "all")


@dataclass(frozen=True)
class Budget:
    """When to stop evaluating a candidate (see :func:`stop_reason`).

    Attributes:
        target: the KL-divergence mean's standard error, as a fraction of the mean, that is precise enough.
        kld_se_floor: a standard error in nats that is precise enough whatever the mean (near-lossless files).
        top1_se: the top-1 agreement's standard error that is precise enough.
        min_tokens: scored positions read before the rule is asked.
        min_chunks: chunks read before the rule is asked, when it knows the chunk length (the error between chunks).
    """

    target: float = DEFAULT_TARGET
    kld_se_floor: float = KLD_SE_FLOOR
    top1_se: float = TOP1_SE_TARGET
    min_tokens: int = MIN_BUDGET_TOKENS
    min_chunks: int = MIN_BUDGET_CHUNKS

    def record(self) -> dict[str, Any]:
        """The manifest's ``budget`` fields that say what was asked."""
        return {
            "target": self.target,
            "kld_se_floor": self.kld_se_floor,
            "top1_se_max": self.top1_se,
            "min_tokens": self.min_tokens,
            "min_chunks": self.min_chunks,
        }


def check_target(value: object, where: str, *, error: type[UsageError] = ConfigError) -> float:
    """``value`` as a fidelity target (a fraction within :data:`TARGET_RANGE`), else ``error`` naming ``where``."""
    low, high = TARGET_RANGE
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(number) and low <= number <= high):
        raise error(
            f"{where} must be a fraction between {low:g} and {high:g}, got {show(value)}",
            hint="0.1: stop when the KL-divergence mean is known to ±10 %; --fidelity-tokens all reads the whole text",
        )
    return number


def spread_order(n: int) -> list[int]:
    """The order chunks ``0 … n − 1`` are read in: chunk 0 first, then each next one halfway into the largest part
    of the text not read yet (a van der Corput sequence), so the first few chunks of a budgeted run sample the
    whole text instead of its opening passages. A run that reads everything reads the same chunks."""
    order: list[int] = []
    seen: set[int] = set()
    i = 0
    while len(order) < n:
        x, f, j = 0.0, 0.5, i
        while j:  # the base-2 radical inverse of i
            x += f * (j & 1)
            j >>= 1
            f /= 2
        c = min(int(x * n), n - 1)
        if c not in seen:
            seen.add(c)
            order.append(c)
        i += 1
    return order


def stop_reason(kld: ArrayLike, top1_same: ArrayLike, budget: Budget, *, per_chunk: int | None = None) -> str | None:
    """Whether the positions scored so far are enough: ``"target"`` when they are, else None.

    Enough means at least ``budget.min_tokens`` positions, a KL-divergence mean whose standard error is at most
    ``budget.target`` × the mean or at most ``budget.kld_se_floor`` nats, and a top-1 agreement whose standard
    error (``sqrt(p (1 − p) / (n − 1))``) is at most ``budget.top1_se``. The errors are the ones reported
    (:func:`error_bars`), so the manifest shows the precision the rule stopped at.

    Args:
        kld: KL(base ‖ candidate) of each position scored so far, in order.
        top1_same: for each of those positions, whether both models rank the same token first (bools or 0/1).
        budget: the rule.
        per_chunk: scored positions per chunk, when ``kld`` is whole chunks: then at least ``budget.min_chunks``
            chunks, and each error is the larger of the per-position one and the one between chunks
            (:func:`chunk_se`).
    """
    import numpy as np

    flags = np.asarray(top1_same, dtype=np.float64)
    n = int(flags.size)
    if n < max(budget.min_tokens, 12) or np.asarray(kld).size != n:
        return None
    if per_chunk and n // per_chunk < budget.min_chunks:
        return None
    mean, se = _rule_se(kld, per_chunk)
    if not (math.isfinite(mean) and math.isfinite(se)):
        return None
    p = float(flags.mean())
    top1_se = max(math.sqrt(p * (1.0 - p) / (n - 1)), (chunk_se(flags, per_chunk) or 0.0) if per_chunk else 0.0)
    kld_ok = se <= budget.kld_se_floor or se <= budget.target * abs(mean)
    return "target" if kld_ok and top1_se <= budget.top1_se else None


def _rule_se(kld: ArrayLike, per_chunk: int | None) -> tuple[float, float]:
    """The KL-divergence mean and the error the rule holds: the per-position one, or the chunks' when larger."""
    mean, se = mean_and_se(kld)
    between = chunk_se(kld, per_chunk) if per_chunk else None
    return mean, (max(se, between) if between is not None and math.isfinite(se) else se)


def tokens_needed(kld: ArrayLike, top1_same: ArrayLike, budget: Budget, *, per_chunk: int | None = None) -> int:
    """How many positions the rule will likely need, from those scored so far: a standard error shrinks as
    ``1 / sqrt(n)``, so ``n × (se / allowed)²`` for the KL-divergence and ``p (1 − p) / top1_se² + 1`` for top-1, at
    least ``budget.min_tokens``. What the base is evaluated up to when a candidate asks for more (an estimate:
    the rule itself decides, chunk by chunk)."""
    import numpy as np

    flags = np.asarray(top1_same, dtype=np.float64)
    n = int(flags.size)
    need = float(max(budget.min_tokens, budget.min_chunks * per_chunk if per_chunk else 0))
    if n > 10:
        mean, se = _rule_se(kld, per_chunk)
        allowed = max(budget.kld_se_floor, budget.target * abs(mean))
        if math.isfinite(se) and se > 0:
            need = max(need, n * (se / allowed) ** 2 if allowed > 0 else math.inf)
        p = float(flags.mean())
        top1_between = (chunk_se(flags, per_chunk) or 0.0) if per_chunk else 0.0
        if top1_between > 0 and budget.top1_se > 0:
            need = max(need, n * (top1_between / budget.top1_se) ** 2)
        if budget.top1_se > 0:
            need = max(need, p * (1.0 - p) / budget.top1_se**2 + 1)
        elif 0.0 < p < 1.0:
            need = math.inf
    return int(min(need, 2**31 - 1))
