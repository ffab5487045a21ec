"""``manifest.json``: what a run produced, from what, with which llama.cpp, and how long it took.

It is also the memory of no-work re-runs: each file entry carries the ``inputs_key`` it was made from, and the
size and modification time it had when published, so an unchanged re-run can trust it without re-hashing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from . import __version__
from .fsutil import atomic_write_json

__all__ = ["MANIFEST_NAME", "SCHEMA", "file_is_current", "inputs_key", "read_manifest", "write_manifest"]

MANIFEST_NAME: Final = "manifest.json"
SCHEMA: Final = 1


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest in ``folder``, or None when there is none or it is unreadable (treated as no record)."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def write_manifest(folder: Path, data: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically and return its path."""
    data = {"schema": SCHEMA, "tool": {"name": "cecai-converter", "version": __version__}, **data}
    path = folder / MANIFEST_NAME
    atomic_write_json(path, data)
    return path


def inputs_key(**parts: Any) -> str:
    """A stable hash of everything a file's bytes depend on (source fingerprint, precision, toolchain, imatrix)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_is_current(entry: Mapping[str, Any], folder: Path, key: str) -> bool:
    """True when ``entry`` was made from ``key`` and its file is still there, unchanged in size and mtime."""
    if entry.get("inputs_key") != key:
        return False
    path = folder / str(entry.get("name", ""))
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == entry.get("bytes") and st.st_mtime_ns == entry.get("mtime_ns")
