"""Quantization honesty: the tensor types llama.cpp really wrote, and per-tensor type overrides (``TENSOR_TYPES``).

A precision such as Q4_K_M is a *recipe*: llama.cpp's quantizer picks each tensor's type (K-quant mixes raise
``attn_v``, ``ffn_down`` and ``output`` on purpose), applies the user's ``--tensor-type PATTERN=TYPE`` overrides,
and then *falls back* to another type where the chosen one cannot hold the tensor: a row length (``ne[0]``) that is
not a multiple of the type's block size (256 for K- and most IQ-quants, 32 for the legacy types) gives Q5_0 instead
of Q4_K, Q8_0 instead of Q6_K, or F16 when nothing fits. This module records what a file holds
(:func:`quantization_record`: a type histogram, the bits per weight of the tensor data, every fallback with its
reason) and parses and checks the overrides (:func:`parse_rule`).

Fallbacks of the quantizer come from its own log (:func:`parse_fallbacks`: llama.cpp says which tensor, which type
it asked for and which it wrote); for a file the converter wrote directly (a Q8_0 base) they are inferred from the
shapes (:func:`shape_fallbacks`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from .errors import UsageError
from .gguf_header import TensorInfo
from .markdown import code, inline
from .names import show

__all__ = [
    "IMATRIX_TYPES",
    "MAX_FALLBACK_LINES",
    "TYPE_IDS",
    "bits_per_weight",
    "needs_imatrix",
    "parse_fallbacks",
    "parse_rule",
    "parse_rules_text",
    "quantization_problem",
    "quantization_record",
    "recorded_tensor_types",
    "rule_type_id",
    "shape_fallbacks",
    "tensor_type_file",
    "type_name",
    "types_markdown",
]

#: The types a ``--tensor-type`` override may name: ggml's type ids (ggml.h of the pinned llama.cpp) of every type
#: llama.cpp's quantizer can write for a weight. Q8_1/Q8_K (dot-product helpers), the integer types and F64 are
#: not weight types; NVFP4, Q1_0 and Q2_0 are left out because the ``gguf`` reader the read-back uses does not know
#: them yet.
TYPE_IDS: Final[Mapping[str, int]] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23,
    "IQ1_M": 29, "BF16": 30, "TQ1_0": 34, "TQ2_0": 35, "MXFP4": 39,
}  # fmt: skip
#: Types llama.cpp refuses to write without an importance matrix ("Missing importance matrix for tensor …").
IMATRIX_TYPES: Final = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"})

# One fallback as llama-quant.cpp's tensor_type_fallback logs it (three log calls, one line):
#   warning: blk.0.ffn_down.weight - ncols    100 not divisible by 256 (required for type    q4_K)
#   [(WARNING: must use F16 due to unusual shape) ]-> falling back to    q5_0
_FALLBACK: Final = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<asked>\S+)\) (?P<f16>\(WARNING: must use F16 due to unusual shape\) )?"
    r"-> falling back to\s+(?P<written>\S+)"
)
_FALLBACK_KEYS: Final = ("tensor", "asked", "written", "reason")
#: A "(?" group that Python's re accepts and ECMAScript (std::regex) refuses: named groups, look-behind, inline flags.
_NOT_ECMASCRIPT: Final = re.compile(r"(?<!\\)\(\?(?![:=!])")


def type_name(ggml_type: int) -> str:
    """ggml's name of a type id, in capitals as gguf-py spells it (``Q4_K``); ``type <n>`` for an unknown id."""
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def _block_size(ggml_type: int) -> int | None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][0]
    except (ValueError, KeyError):
        return None


def _type_bytes(info: TensorInfo) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    return info.n_elements // block * type_size


def bits_per_weight(n_bytes: int, n_params: int) -> float | None:
    """Bits per weight, to 3 decimals: ``n_bytes`` × 8 / ``n_params`` (None without parameters).

    The one computation behind both numbers a manifest records: the file's (``bpw``: every byte, metadata and
    vocabulary included, as llama.cpp's published tables measure) and the tensor data's (``quantization.bpw``).
    """
    return round(n_bytes * 8 / n_params, 3) if n_params > 0 else None


# -- per-tensor overrides ----------------------------------------------------------------------------------------------
def parse_rule(text: str, where: str) -> str:
    """One ``PATTERN=TYPE`` override, checked and normalised (``TYPE`` in capitals: ``ffn_down=Q8_0``).

    llama.cpp's rules: the text is split at its first ``=``; the pattern is a regular expression (C++
    ``std::regex``, ECMAScript) searched in each tensor name; the type is a ggml type name, in any case.
    ``llama-quantize`` lower-cases the pattern, and its ``--tensor-type-file`` separates entries by white space:
    a pattern with capitals or spaces would not mean the same there, so it is refused.

    Raises:
        UsageError: naming ``where`` and the entry: no ``=``, an empty side, white space, capitals, a pattern that
            is no regular expression (or uses Python-only syntax), an unknown type.
    """
    example = "e.g. ffn_down=q8_0 or 'blk\\.[0-3]\\.attn_v=q6_k'"
    entry = show(text)
    if not isinstance(text, str) or "=" not in text:
        raise UsageError(f"{where}: {entry} is not PATTERN=TYPE", hint=example)
    pattern, _, type_text = text.strip().partition("=")
    if not pattern or not type_text:
        raise UsageError(f"{where}: {entry} has an empty {'pattern' if not pattern else 'type'}", hint=example)
    if any(c.isspace() for c in pattern):
        raise UsageError(
            f"{where}: the pattern of {entry} holds white space",
            hint="llama-quantize's --tensor-type-file separates entries by white space; use \\s in the pattern",
        )
    if _NOT_ECMASCRIPT.search(pattern):
        raise UsageError(
            f"{where}: the pattern of {entry} uses a group llama.cpp's regular expressions (C++ std::regex, "
            "ECMAScript) do not have: only (?:…), (?=…) and (?!…) (no named groups, look-behind or inline flags)",
            hint=example,
        )
    if pattern != pattern.lower():
        raise UsageError(
            f"{where}: the pattern of {entry} has capital letters",
            hint="tensor names are lower case and llama-quantize lower-cases every pattern (\\D would become \\d): "
            "write it in lower case",
        )
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{where}: the pattern of {entry} is not a regular expression ({exc})", hint=example) from None
    name = type_text.strip().upper()
    if name not in TYPE_IDS:
        raise UsageError(
            f"{where}: {entry} names the type {show(type_text)}, which llama.cpp's quantizer cannot write",
            hint="one of " + ", ".join(n.lower() for n in TYPE_IDS) + " (several entries: separate them by spaces)",
        )
    return f"{pattern}={name}"


def parse_rules_text(text: str, where: str) -> tuple[str, ...]:
    """Overrides written as text (a variable, an action input): entries separated by white space, as in
    ``llama-quantize --tensor-type-file``.

    Raises:
        UsageError: the first bad entry (see :func:`parse_rule`).
    """
    return tuple(parse_rule(item, where) for item in text.split())


def parse_rules(value: object, where: str) -> tuple[str, ...]:
    """Overrides as JSON or YAML gives them: a list of ``PATTERN=TYPE`` strings, a mapping pattern → type, or one
    string of white-space separated entries.

    Raises:
        UsageError: the value is none of these, or an entry is bad (see :func:`parse_rule`).
    """
    if isinstance(value, str):
        return parse_rules_text(value, where)
    if isinstance(value, Mapping):
        items: Iterable[object] = [
            f"{k}={v}" if isinstance(k, str) and isinstance(v, str) else (k, v) for k, v in value.items()
        ]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise UsageError(
            f"{where} must be a list of PATTERN=TYPE entries, got {show(value)}",
            hint="e.g. [ffn_down=q8_0, attn_v=q6_k], or a mapping {ffn_down: q8_0}",
        )
    rules: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UsageError(f"{where}: the entry {show(item)} is not a PATTERN=TYPE string")
        rules.append(parse_rule(item, where))
    return tuple(rules)


def rule_type_id(rule: str) -> tuple[str, int]:
    """A normalised rule's pattern and ggml type id (what ``llama_model_quantize_params.tt_overrides`` takes)."""
    pattern, _, name = rule.partition("=")
    return pattern, TYPE_IDS[name]


def needs_imatrix(rules: Sequence[str]) -> list[str]:
    """The rules whose type llama.cpp refuses to write without an importance matrix."""
    return [r for r in rules if r.partition("=")[2] in IMATRIX_TYPES]


def tensor_type_file(rules: Sequence[str]) -> str:
    """The text of a ``llama-quantize --tensor-type-file``: one ``PATTERN=TYPE`` per line, in the order given (the
    first pattern that matches a tensor wins)."""
    return "".join(f"{rule}\n" for rule in rules)


def recorded_tensor_types(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The per-tensor overrides (TENSOR_TYPES) the files were quantized with: the files' ``quantization`` records,
    else the recorded request's value; checked like the option (a manifest may come from anywhere).

    Raises:
        UsageError: a recorded override is malformed.
    """
    for entry in manifest.get("files") or []:
        record = entry.get("quantization") if isinstance(entry, Mapping) else None
        if isinstance(record, Mapping) and record.get("overrides"):
            return parse_rules(record["overrides"], "the manifest's quantization.overrides")
    values = (manifest.get("request") or {}).get("values") or {}
    if values.get("tensor_types"):
        return parse_rules(values["tensor_types"], "the manifest's request.values.tensor_types")
    return ()


# -- what a file holds -------------------------------------------------------------------------------------------------
def parse_fallbacks(log: str) -> list[dict[str, str]]:
    """Every fallback in the quantizer's log: ``tensor``, ``asked`` (the recipe's type, after the mix rules and
    the overrides), ``written`` and ``reason``; types in capitals."""
    out: list[dict[str, str]] = []
    for m in _FALLBACK.finditer(log):
        asked, written = m["asked"].upper(), m["written"].upper()
        reason = f"row length {m['ncols']} is not a multiple of {m['block']}, the block size of {asked}"
        if m["f16"]:
            reason += f", nor of the fallback's block size: {written} is the last resort"
        out.append({"tensor": m["tensor"], "asked": asked, "written": written, "reason": reason})
    return out


def shape_fallbacks(tensors: Sequence[TensorInfo], target: int) -> list[dict[str, str]]:
    """Fallbacks of a file the converter wrote directly at a quantized type ``target`` (a Q8_0 base): the weight
    matrices (two or more dimensions) held in another type whose rows the target's blocks do not divide."""
    block = _block_size(target)
    if block is None or block <= 1:
        return []
    asked = type_name(target)
    return [
        {
            "tensor": t.name,
            "asked": asked,
            "written": type_name(t.ggml_type),
            "reason": f"row length {t.shape[0]} is not a multiple of {block}, the block size of {asked}",
        }
        for t in tensors
        if len(t.shape) >= 2 and t.ggml_type != target and t.shape[0] % block != 0
    ]


def quantization_record(
    tensors: Sequence[TensorInfo], *, fallbacks: Sequence[Mapping[str, str]], overrides: Sequence[str]
) -> dict[str, Any]:
    """A file's ``quantization`` record in the manifest.

    Returns:
        ``types`` (type name → ``{"tensors", "bytes"}``, largest share first), ``bpw`` (tensor data bits per
        weight), ``fallbacks`` (each ``tensor``, ``asked``, ``written``, ``reason``, with ``written`` as read back
        from the file) and ``overrides`` (the ``PATTERN=TYPE`` rules the quantizer was given).
    """
    types: dict[str, dict[str, int]] = {}
    for t in tensors:
        row = types.setdefault(type_name(t.ggml_type), {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += _type_bytes(t)
    written = {t.name: type_name(t.ggml_type) for t in tensors}
    total = sum(row["bytes"] for row in types.values())
    return {
        "types": dict(sorted(types.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))),
        "bpw": bits_per_weight(total, sum(t.n_elements for t in tensors)),
        "fallbacks": [{**f, "written": written.get(f["tensor"], f["written"])} for f in fallbacks],
        "overrides": list(overrides),
    }


def quantization_problem(value: object) -> str | None:
    """What is wrong with a manifest's ``quantization`` record, as ``key: why``; None when it is sound."""
    if not isinstance(value, dict):
        return "expected an object"
    types = value.get("types")
    if not isinstance(types, dict):
        return "types: expected an object"
    for name, row in types.items():
        if not (
            isinstance(row, dict)
            and all(isinstance(row.get(k), int) and not isinstance(row.get(k), bool) for k in ("tensors", "bytes"))
        ):
            return f"types.{name}: expected an object with whole numbers tensors and bytes"
    bpw = value.get("bpw")
    if bpw is not None and (isinstance(bpw, bool) or not isinstance(bpw, (int, float))):
        return "bpw: expected a number"
    fallbacks = value.get("fallbacks")
    if not isinstance(fallbacks, list):
        return "fallbacks: expected a list"
    for i, row in enumerate(fallbacks):
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in _FALLBACK_KEYS)):
            return f"fallbacks[{i}]: expected an object with tensor, asked, written and reason"
    overrides = value.get("overrides")
    if not isinstance(overrides, list) or not all(isinstance(r, str) for r in overrides):
        return "overrides: expected a list of PATTERN=TYPE strings"
    return None


# -- how it reads ------------------------------------------------------------------------------------------------------
#: fallbacks listed per file in the report and the card; the manifest keeps every one
MAX_FALLBACK_LINES: Final = 10


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def types_markdown(files: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines (the report's and the model card's): per file, the tensor types llama.cpp wrote (share of
    the tensor bytes), the tensor data's bits per weight, the overrides given and the fallbacks (the first
    :data:`MAX_FALLBACK_LINES`) from the manifest's ``quantization`` records; nothing when no file has one."""

    out: list[str] = []
    for f in files:
        q = f.get("quantization")
        if not isinstance(q, Mapping) or not isinstance(q.get("types"), Mapping):
            continue
        types = {str(k): v for k, v in q["types"].items() if isinstance(v, Mapping) and _is_number(v.get("bytes"))}
        total = sum(float(v["bytes"]) for v in types.values()) or 1.0
        mix = ", ".join(
            f"{inline(name)} ×{inline(v.get('tensors', '?'))} ({100 * float(v['bytes']) / total:.1f}%)"
            for name, v in sorted(types.items(), key=lambda kv: (-float(kv[1]["bytes"]), kv[0]))
        )  # largest share first (a manifest's JSON keeps its keys sorted by name)
        bpw = f"{q['bpw']:.2f} bits per weight in the tensors" if _is_number(q.get("bpw")) else "bpw unknown"
        fallbacks = [x for x in q.get("fallbacks") or [] if isinstance(x, Mapping)]
        line = f"- {code(f.get('name', '?'))}: {mix}; {bpw}; "
        line += f"{len(fallbacks)} fallback(s)" if fallbacks else "no fallback"
        overrides = [str(r) for r in q.get("overrides") or []]
        if overrides:
            line += "; overrides " + ", ".join(code(r) for r in overrides)
        out.append(line)
        out += [
            f"  - {code(x.get('tensor', '?'))}: asked {inline(x.get('asked', '?'))}, wrote "
            f"{inline(x.get('written', '?'))} ({inline(x.get('reason', ''))})"
            for x in fallbacks[:MAX_FALLBACK_LINES]
        ]
        if len(fallbacks) > MAX_FALLBACK_LINES:
            out.append(f"  - and {len(fallbacks) - MAX_FALLBACK_LINES} more (the manifest lists them all)")
    return ["", "Tensor types as written:", "", *out] if out else []
