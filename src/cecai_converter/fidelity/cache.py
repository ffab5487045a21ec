"""The base's evaluation on disk, kept between runs.

The base's log-probabilities are computed once and kept on disk, one float32 file per chunk, so memory stays at one
chunk (``n_ctx × n_vocab``) however large the vocabulary; disk use is ``4 × n_tokens × n_vocab`` bytes, in a
temporary folder removed afterwards, or (:func:`measure_run` with a ``cache_root``) kept between runs under a key of
the base's bytes and the text (:func:`base_cache_key`), so a re-run that adds a precision does not evaluate the base
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Final

from ..fsutil import sha256_file
from ..toolchain import LLAMA_CPP_PYTHON_VERSION

#: Base evaluations kept in the cache (each is 4 × tokens × vocabulary bytes: hundreds of MB for a large vocabulary).
_CACHE_KEEP: Final = 4
#: Bumped when the cached files' layout or meaning changes.
_CACHE_VERSION: Final = 2


def base_cache_key(base_sha256: str, text: Path, *, n_ctx: int, max_tokens: int) -> str:
    """What a base evaluation depends on: the base's bytes, the text's bytes, the chunk length and the tokens read
    (so the scored positions), and this code's layout of the cached files."""
    parts = {
        "version": _CACHE_VERSION,
        "base": base_sha256,
        "text": sha256_file(text),
        "n_ctx": n_ctx,
        "max_tokens": max_tokens,
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def default_cache_root() -> Path:
    """Where base evaluations are kept between runs: ``$XDG_CACHE_HOME/cecai-converter/fidelity`` (as the Hub
    downloads are), so a re-run that adds a precision reuses the base's log-probabilities."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cecai-converter" / "fidelity"


def _prune_cache(root: Path, keep: Path) -> None:
    """Keep the :data:`_CACHE_KEEP` most recently used base evaluations in ``root`` (``keep`` among them)."""

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another run's pruning
            return 0.0

    try:
        entries = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    entries.sort(key=lambda p: (p == keep, used(p)), reverse=True)
    for old in entries[_CACHE_KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def _cached_chunks(work: Path) -> tuple[dict[str, Any] | None, int]:
    """The cached base evaluation's facts and how many chunks of it are on disk (0, 1, … in order)."""
    try:
        meta = json.loads((work / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, 0
    sizes = [meta.get(k) for k in ("n_ctx", "n_vocab", "n_chunks")] if isinstance(meta, dict) else []
    ok = len(sizes) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
    if not ok or meta.get("version") != _CACHE_VERSION:  # damaged or of another layout: made again
        return None, 0
    ready = 0
    while (
        ready < int(meta.get("n_chunks", 0))
        and (work / f"base-{ready}.npy").is_file()
        and (work / f"base-nll-{ready}.npy").is_file()
    ):
        ready += 1
    return meta, ready
