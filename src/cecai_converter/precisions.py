"""The precision table: every GGUF file type this project produces, as llama.cpp names it.

This is the one place that knows precisions. The CLI's choices, configuration validation, the `precisions`
command, the action inputs and the nox parametrisation all derive from :data:`PRECISIONS`.

``ftype`` values are llama.cpp's ``llama_ftype`` (``gguf.LlamaFileType``); ``tests/test_precisions.py`` checks
them against both the converter's own ``gguf-py`` and ``llama_cpp`` so that a toolchain bump cannot drift.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from .errors import ConfigError

__all__ = [
    "ALIASES",
    "CONVERTER_OUTTYPES",
    "DEFAULT_PRECISIONS",
    "PRECISIONS",
    "PrecisionInfo",
    "parse_precision",
    "parse_precisions",
]


@dataclass(frozen=True)
class PrecisionInfo:
    """One GGUF file type.

    Attributes:
        name: llama.cpp's name (``Q4_K_M``); the file suffix is its lower case (``gpt2.q4_k_m.gguf``).
        ftype: llama.cpp's ``llama_ftype`` value, also written to ``general.file_type``.
        bpw: bits per weight. Measured on a whole Llama-3.1-8B file where ``bpw_measured``; otherwise the
            block format's nominal figure (llama.cpp's quantize help), which is a lower bound for a whole file.
        bpw_measured: whether ``bpw`` is a whole-file measurement.
        needs_imatrix: llama.cpp refuses this type without an importance matrix.
        converter_outtype: the ``convert_hf_to_gguf.py --outtype`` that writes this type directly, if any.
        description: one line for the table.
    """

    name: str
    ftype: int
    bpw: float
    bpw_measured: bool
    needs_imatrix: bool = False
    converter_outtype: str | None = None
    description: str = ""

    @property
    def suffix(self) -> str:
        """The lower-case name used in file names (``q4_k_m``)."""
        return self.name.lower()

    @property
    def is_float(self) -> bool:
        """True for the unquantized types (F32, F16, BF16)."""
        return self.name in ("F32", "F16", "BF16")


def _p(*args: object, **kwargs: object) -> tuple[str, PrecisionInfo]:
    info = PrecisionInfo(*args, **kwargs)  # type: ignore[arg-type]
    return info.name, info


# Ordered from largest to smallest file, the order users read the table in.
PRECISIONS: Final[MappingProxyType[str, PrecisionInfo]] = MappingProxyType(
    dict(
        [
            _p("F32", 0, 32.0, False, converter_outtype="f32", description="32-bit float, lossless"),
            _p("F16", 1, 16.0, False, converter_outtype="f16", description="16-bit float"),
            _p("BF16", 32, 16.0, False, converter_outtype="bf16", description="bfloat16, lossless for bf16 models"),
            _p("Q8_0", 7, 8.50, True, converter_outtype="q8_0", description="8-bit, near lossless"),
            _p("Q6_K", 18, 6.56, True, description="6-bit k-quant"),
            _p("Q5_1", 9, 6.0, False, description="5-bit legacy"),
            _p("Q5_K_M", 17, 5.70, True, description="5-bit k-quant, medium"),
            _p("Q5_K_S", 16, 5.57, True, description="5-bit k-quant, small"),
            _p("Q5_0", 8, 5.5, False, description="5-bit legacy"),
            _p("Q4_1", 3, 5.0, False, description="4-bit legacy"),
            _p("Q4_K_M", 15, 4.89, True, description="4-bit k-quant, medium: the usual default"),
            _p("Q4_K_S", 14, 4.67, True, description="4-bit k-quant, small"),
            _p("Q4_0", 2, 4.5, False, description="4-bit legacy"),
            _p("IQ4_NL", 25, 4.5, False, description="4-bit non-linear"),
            _p("IQ4_XS", 30, 4.46, True, description="4-bit non-linear, extra small"),
            _p("Q3_K_L", 13, 4.30, True, description="3-bit k-quant, large"),
            _p("Q3_K_M", 12, 4.00, True, description="3-bit k-quant, medium"),
            _p("IQ3_M", 27, 3.66, False, description="3-bit i-quant mix"),
            _p("Q3_K_S", 11, 3.64, True, description="3-bit k-quant, small"),
            _p("IQ3_S", 26, 3.44, False, description="3-bit i-quant"),
            _p("IQ3_XS", 22, 3.3, False, description="3-bit i-quant, extra small"),
            _p("Q2_K", 10, 3.16, True, description="2-bit k-quant"),
            _p("IQ3_XXS", 23, 3.06, False, needs_imatrix=True, description="3-bit i-quant, smallest"),
            _p("Q2_K_S", 21, 2.96, False, needs_imatrix=True, description="2-bit k-quant, small"),
            _p("IQ2_M", 29, 2.7, False, needs_imatrix=True, description="2-bit i-quant mix"),
            _p("IQ2_S", 28, 2.5, False, needs_imatrix=True, description="2-bit i-quant"),
            _p("IQ2_XS", 20, 2.31, False, needs_imatrix=True, description="2-bit i-quant, extra small"),
            _p("IQ2_XXS", 19, 2.38, True, needs_imatrix=True, description="2-bit i-quant, smallest"),
            _p("TQ2_0", 37, 2.06, False, converter_outtype="tq2_0", description="ternary, for ternary models"),
            _p("IQ1_S", 24, 2.00, True, needs_imatrix=True, description="1-bit i-quant"),
            _p("IQ1_M", 31, 1.75, False, needs_imatrix=True, description="1-bit i-quant mix"),
            _p("TQ1_0", 36, 1.69, False, converter_outtype="tq1_0", description="ternary, for ternary models"),
        ]
    )
)

#: Old spellings and llama.cpp's short aliases, resolved case-insensitively.
ALIASES: Final[MappingProxyType[str, str]] = MappingProxyType(
    {
        "FP32": "F32",
        "FP16": "F16",
        "FLOAT32": "F32",
        "FLOAT16": "F16",
        "BFLOAT16": "BF16",
        "Q3_K": "Q3_K_M",
        "Q4_K": "Q4_K_M",
        "Q5_K": "Q5_K_M",
    }
)

#: Types ``convert_hf_to_gguf.py`` writes itself.
CONVERTER_OUTTYPES: Final[frozenset[str]] = frozenset(
    info.name for info in PRECISIONS.values() if info.converter_outtype
)

#: What the demo's seed layout converts to (near lossless, and the usual default).
DEFAULT_PRECISIONS: Final[tuple[str, ...]] = ("Q8_0", "Q4_K_M")


def parse_precision(value: object, *, where: str = "PRECISION") -> PrecisionInfo:
    """Resolve one user-written precision (``q4_k_m``, ``FP16``, ``Q4_K``) to its table entry.

    Raises:
        ConfigError: the value is not a known precision; the message lists the valid names and the closest one.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{where}: expected a precision name such as Q4_K_M, got {value!r}",
            hint=f"valid precisions: {', '.join(PRECISIONS)}",
        )
    key = value.strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    info = PRECISIONS.get(key)
    if info is None:
        close = difflib.get_close_matches(key, [*PRECISIONS, *ALIASES], n=1, cutoff=0.6)
        suggestion = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"{where}: unknown precision {value!r}.{suggestion}",
            hint=f"valid precisions (case-insensitive): {', '.join(PRECISIONS)}; "
            f"aliases: {', '.join(f'{a}={t}' for a, t in ALIASES.items())}. "
            "Run `cecai-convert precisions` for the table.",
        )
    return info


def parse_precisions(values: object, *, where: str = "PRECISION") -> tuple[PrecisionInfo, ...]:
    """Resolve one precision or a list of them, keeping the user's order and dropping repeats.

    Raises:
        ConfigError: the list is empty or holds an unknown precision.
    """
    items = values if isinstance(values, (list, tuple)) else [values]
    if not items:
        raise ConfigError(f"{where}: the list is empty", hint="give at least one precision, e.g. Q4_K_M")
    seen: dict[str, PrecisionInfo] = {}
    for item in items:
        info = parse_precision(item, where=where)
        seen.setdefault(info.name, info)
    return tuple(seen.values())
