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
    """The manifest in ``folder``, or None when there is none or it is unreadable (treated as no record).

    A manifest that is there but malformed (edited by hand, damaged) is also no record: a warning names the file and
    the field, and ``run`` redoes the folder and writes a new one, instead of failing on a wrong type later.
    """
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        problem = f"not readable JSON ({type(exc).__name__})"
    else:
        problem = _manifest_problem(data)
    if problem is not None:
        from .output import get_logger

        get_logger("manifest").warning(f"ignoring {path}: {problem}; the folder is treated as having no record")
        return None
    return data


def _manifest_problem(data: object) -> str | None:
    """The first field of a manifest that readers would trip over, as ``field: why``; None when it is sound."""
    from .errors import UsageError
    from .names import check_plain_name, check_stem

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    if data.get("schema") != SCHEMA:
        return f"schema: expected {SCHEMA}"
    for key in ("source", "timings", "runtime", "base", "toolchain"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"{key}: expected an object"
    if data.get("pair") is not None and not isinstance(data["pair"], str):
        return "pair: expected a string"
    if data.get("model_name") is not None:  # names files next to the manifest: never a path
        try:
            check_stem(data["model_name"], "model_name")
        except UsageError as exc:
            return exc.message
    files = data.get("files", [])
    if not isinstance(files, list):
        return "files: expected a list"
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            return f"files[{i}]: expected an object"
        why = check_plain_name(entry.get("name"))
        if why is not None:
            return f"files[{i}].name: {why}"
        for key, ok in (
            ("precision", lambda v: isinstance(v, str)),
            ("sha256", lambda v: isinstance(v, str)),
            ("bytes", is_int),
        ):
            if not ok(entry.get(key)):
                return f"files[{i}].{key}: missing or of the wrong type"
        for key, ok in (
            ("mtime_ns", is_int),
            ("inputs_key", lambda v: isinstance(v, str)),
            ("verification", lambda v: isinstance(v, dict)),
            ("fidelity", lambda v: isinstance(v, dict)),
        ):
            if entry.get(key) is not None and not ok(entry[key]):
                return f"files[{i}].{key}: of the wrong type"
    source = data.get("source") or {}
    if source.get("path") is not None and not isinstance(source["path"], str):
        return "source.path: expected a string"
    records = source.get("files", [])
    if not isinstance(records, list):
        return "source.files: expected a list"
    for i, record in enumerate(records):
        if not (
            isinstance(record, dict)
            and isinstance(record.get("path"), str)
            and isinstance(record.get("sha256"), str)
            and is_int(record.get("bytes"))
            and is_int(record.get("mtime_ns"))
        ):
            return f"source.files[{i}]: expected an object with path, bytes, mtime_ns and sha256"
    return None


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
