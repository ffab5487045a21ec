"""The source model's own card, as read at conversion time: the manifest's ``source.card``.

:func:`read_source_card` reads what a model folder says about its license and origin (``README.md``'s front matter,
``config.json``'s ``license`` and ``architectures``, the license files' names and hashes); :func:`source_card_field`
is what the pipeline merges into a source record. The model card this tool writes (``card``) quotes it.

The source's README is hostile input like any other file of a model folder: it is read up to a size limit, its
front matter parsed with ``yaml.safe_load`` (no object construction), and only a few top-level string fields are
kept, bounded and stripped of control characters, so a YAML alias bomb is never walked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Final

import yaml

from .fsutil import sha256_file

__all__ = [
    "CARD_NAME",
    "RELATIONS",
    "REPO_ID",
    "read_source_card",
    "source_card_field",
    "split_front_matter",
]

#: A model card's file name: the source's own, and the one this tool writes beside the GGUF files.
CARD_NAME: Final = "README.md"

#: How much of the source's README is read: front matter sits at the top, and a card is never this large.
_MAX_README_BYTES: Final = 256 * 1024
_MAX_FRONT_MATTER_CHARS: Final = 64 * 1024
_MAX_FIELD_CHARS: Final = 200
_MAX_LICENSE_FILES: Final = 4
#: A Hugging Face repo id (``owner/name``): the only base model a card names, and the only one linked.
REPO_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_LICENSE_FILE: Final = re.compile(r"^(LICEN[CS]E|COPYING)([._-][A-Za-z0-9._-]{0,40})?$", re.IGNORECASE)
#: The Hub's ``base_model_relation`` values: a source card's own is carried over only when it is one of these.
RELATIONS: Final = frozenset({"adapter", "merge", "quantized", "finetune"})


def _clean(value: object, limit: int = _MAX_FIELD_CHARS) -> str | None:
    """A short printable string, or None: anything else a hostile card holds is dropped, not echoed."""
    if not isinstance(value, str):
        return None
    text = "".join(c for c in value.strip() if c.isprintable())
    return text[:limit] if text else None


def split_front_matter(text: str) -> tuple[dict[str, Any] | None, str]:
    """A Markdown card's YAML front matter (``---`` … ``---`` at the very top) as a mapping, and the body after it.

    Returns ``(None, text)`` when there is no front matter, or when it is not a YAML mapping of a sane size
    (unparseable metadata is no metadata: a card is documentation, never a reason to fail).
    """
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return None, text
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            block = "".join(lines[1:i])
            body = "".join(lines[i + 1 :])
            break
    else:
        return None, text
    if len(block) > _MAX_FRONT_MATTER_CHARS:
        return None, body
    try:
        data = yaml.safe_load(block)
    except (yaml.YAMLError, RecursionError, ValueError):
        return None, body
    return (data if isinstance(data, dict) else None), body


def _base_models(value: object) -> list[str]:
    items = value if isinstance(value, list) else [value]
    found = [c for item in items[:16] if (c := _clean(item)) is not None and REPO_ID.match(c)]
    return list(dict.fromkeys(found))


def read_source_card(folder: Path) -> dict[str, Any] | None:
    """What a model folder says about its license and origin, for the manifest's ``source.card``.

    Reads ``README.md``'s front matter (``license``, ``license_name``, ``license_link``, ``base_model`` and its
    ``base_model_relation``), ``config.json``'s ``license`` and ``architectures``, and names and hashes the license
    files (``LICENSE*``, ``LICENCE*``, ``COPYING*``) at the top of the folder.

    Returns:
        The record, or None when the folder says nothing of the kind.
    """
    record: dict[str, Any] = {}
    readme = folder / CARD_NAME
    if readme.is_file():
        try:
            with readme.open("rb") as fh:
                raw = fh.read(_MAX_README_BYTES)
        except OSError:
            raw = b""
        front, _ = split_front_matter(raw.decode("utf-8", errors="replace"))
        if front:
            for key in ("license", "license_name", "license_link"):
                value = _clean(front.get(key), 500 if key == "license_link" else _MAX_FIELD_CHARS)
                if value is not None:
                    record[key] = value
            base = _base_models(front.get("base_model"))
            if base:
                record["base_model"] = base
                relation = _clean(front.get("base_model_relation"))
                if relation in RELATIONS:
                    record["base_model_relation"] = relation
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            config = None
        if isinstance(config, dict):
            # `_name_or_path` is not read: for a fine-tune it names the model it was trained from, not this one.
            if "license" not in record and (lic := _clean(config.get("license"))) is not None:
                record["license"] = lic
            archs = config.get("architectures")
            if isinstance(archs, list) and archs and (arch := _clean(archs[0])) is not None:
                record["architecture"] = arch
    files: list[dict[str, Any]] = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if len(files) >= _MAX_LICENSE_FILES:
            break
        if _LICENSE_FILE.match(path.name) and path.is_file():
            files.append({"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    if files:
        record["license_files"] = files
    meaningful = set(record) - {"architecture"}
    return record if meaningful or record.get("architecture") else None


def source_card_field(folder: Path) -> dict[str, Any]:
    """``{"card": record}`` for a source record (see :func:`read_source_card`), or ``{}`` when there is nothing.

    Never fails a conversion: a card that cannot be read is no card.
    """
    try:
        record = read_source_card(folder)
    except OSError:
        return {}
    return {"card": record} if record else {}
