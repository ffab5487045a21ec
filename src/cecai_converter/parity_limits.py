"""The limits of the source check: llama.cpp's NMSE pass mark, and what a ``THRESHOLDS: {source: {...}}`` entry may set
(:func:`validate_limits`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from .errors import ConfigError
from .names import show

#: llama.cpp's pass mark for a conversion (``check-nmse.py``): NMSE at or above it fails.
MAX_NMSE: Final = 1e-2
#: Below this llama.cpp calls a conversion "excellent".
EXCELLENT_NMSE: Final = 1e-4
#: The limits a ``THRESHOLDS: {source: {...}}`` entry may set → (logits key, whether the value must stay at or below).
LIMIT_KEYS: Final[Mapping[str, tuple[str, bool]]] = {
    "max_nmse": ("nmse", True),
    "max_kld": ("kld_mean", True),
    "min_top1": ("top1_agreement", False),
}


def validate_limits(value: object, where: str) -> dict[str, float]:
    """A ``THRESHOLDS: {source: {...}}`` entry, checked.

    Raises:
        ConfigError: not a mapping, an unknown limit, or a value that is not a finite number.
    """
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: source: expected a mapping of limits, got {show(value)}",
                          hint="e.g. THRESHOLDS: {source: {max_nmse: 0.001}}")  # fmt: skip
    checked: dict[str, float] = {}
    for name, limit in value.items():
        if name not in LIMIT_KEYS:
            raise ConfigError(f"{where}: source: unknown limit {show(name)}", hint=f"known: {', '.join(LIMIT_KEYS)}")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            raise ConfigError(f"{where}: source.{name} must be a number, got {show(limit)}")
        checked[str(name)] = float(limit)
    return checked
