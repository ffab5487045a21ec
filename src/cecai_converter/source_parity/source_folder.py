"""What the source folder says: its config.json (and the text model's part of it), the repository's own classes
(``auto_map``), the weights counted from the safetensors headers; the memory the source side may use."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..errors import UsageError
from ..names import show

#: A memory budget for the source model, in bytes (``8G``, ``512M`` and ``8GiB`` are accepted too).
RAM_BUDGET_ENV: Final = "CECAI_SOURCE_RAM_BUDGET"
#: Memory beyond the float32 weights: the interpreter, torch and transformers, activations, the tokenizer.
_HEADROOM_BYTES: Final = 1536 * 2**20
_HEADROOM_FACTOR: Final = 1.25


def float32_estimate(folder: Path) -> int:
    """The memory the source model needs in float32 (its weights × 4) with headroom, in bytes."""
    return int(parameter_count(folder) * 4 * _HEADROOM_FACTOR) + _HEADROOM_BYTES


def ram_budget() -> int:
    """The memory the source side may use: ``CECAI_SOURCE_RAM_BUDGET`` when set, else ``MemAvailable``.

    Raises:
        UsageError: the variable is not a size.
    """
    text = os.environ.get(RAM_BUDGET_ENV, "").strip()
    if text:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?", text, re.IGNORECASE)
        if match is None:
            raise UsageError(
                f"{RAM_BUDGET_ENV}={show(text)} is not a size", hint="give bytes, or a number with K, M, G or T"
            )
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
        return int(float(match.group(1)) * scale)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 2**30  # no /proc (not Linux): a modest machine


def parameter_count(folder: Path) -> int:
    """The weights in the folder's safetensors files, from their headers (0 when it has none)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, RecursionError, struct.error):
            continue
        for key, info in header.items():
            if key != "__metadata__" and isinstance(info, dict):
                count = 1
                for dim in info.get("shape", []):
                    count *= int(dim)
                total += count
    return total


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; empty when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text model's part of a config.json (``text_config`` of a multimodal one), else the whole."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def needs_remote_code(config: Mapping[str, Any], what: str) -> str | None:
    """The ``auto_map`` entry naming the repository's own class for ``what`` (AutoModelForCausalLM…), if any."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, Mapping):
        return None
    value = auto_map.get(what)
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str)), None)
    return value if isinstance(value, str) else None
