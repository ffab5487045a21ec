"""The limits a measured file is held to (``THRESHOLDS``, ``check --max-kld/--min-top1``): their names, their one
range rule, the configuration's check of them (:func:`validate_thresholds`) and the comparison with the results
(:func:`check_thresholds`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from ..errors import ConfigError, UsageError
from ..names import show
from ..parity_limits import validate_limits
from ..precisions import parse_precision

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
    example = "e.g. THRESHOLDS: {Q4_K_M: {max_kld: 0.1, max_ppl_delta_pct: 5}}"
    if thresholds is None:
        return {}
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"{where}: expected a mapping PRECISION -> limits, got {show(thresholds)}", hint=example)
    checked: dict[str, dict[str, float]] = {}
    for precision, limits in thresholds.items():
        if isinstance(precision, str) and precision.lower() == "source":  # the base against its source model
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
