"""Files that appear whole or not at all.

Work happens in a staging folder inside the outputs folder (same filesystem, so the final move is an atomic
rename). Nothing half-written ever sits at a final path: a file is written under a hidden temporary name and
renamed into place. Staging folders carry the owner's pid; a later run removes those whose owner is gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConversionFailed

__all__ = [
    "STAGING_PREFIX",
    "atomic_write_text",
    "publish_file",
    "remove_stale_staging",
    "sha256_file",
    "staging_dir",
]

STAGING_PREFIX = ".cecai-tmp-"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove staging folders (and hidden partial files) left in ``folder`` by runs that were killed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
            try:
                pid = int((entry / "owner.pid").read_text().strip())
            except (OSError, ValueError):
                pid = -1
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif entry.name.startswith(".") and entry.name.endswith(".partial") and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A fresh staging folder inside ``parent``, removed on exit whatever happens (Ctrl-C and SIGTERM included)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    try:
        (path / "owner.pid").write_text(f"{os.getpid()}\n")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _disk_full(exc: OSError, where: Path) -> ConversionFailed:
    return ConversionFailed(
        f"the disk is full: could not write {where}; nothing partial was left in place",
        hint=f"free space on the filesystem of {where.parent} and re-run",
    )


def publish_file(src: Path, dest: Path) -> None:
    """Place ``src``'s content at ``dest`` atomically: hard link when possible, else copy, then rename.

    Raises:
        ConversionFailed: the disk filled up (the partial copy is removed).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(exc, dest) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(exc, path) from None
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON via a temporary file and a rename."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
