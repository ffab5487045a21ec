"""Files that appear whole or not at all.

Work happens in a staging folder inside the outputs folder (same filesystem, so the final move is an atomic
rename; :func:`install_file`). Nothing half-written ever sits at a final path: a file is written under a hidden
temporary name and renamed into place. Staging folders carry the owner's pid; a later run removes those whose owner
is gone.

One run at a time per outputs folder: a run holds :func:`outputs_lock` (``flock`` on ``.cecai.lock``, which records
its pid, host, command and start time) while it works there, and only the holder removes leftovers, so a live
run's staging folder is never deleted under it. The kernel drops the lock when its holder dies, ``kill -9``
included.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConversionFailed, UsageError
from .output import get_logger

__all__ = [
    "LOCK_NAME",
    "LOCK_TIMEOUT_ENV",
    "STAGING_PREFIX",
    "atomic_write_text",
    "install_file",
    "outputs_lock",
    "remove_stale_staging",
    "sha256_file",
    "staging_dir",
]

STAGING_PREFIX = ".cecai-tmp-"
LOCK_NAME = ".cecai.lock"
#: seconds a run waits for another run's lock on its outputs folder before it gives up (exit 1); unset: no limit
LOCK_TIMEOUT_ENV = "CECAI_LOCK_TIMEOUT"


def _this_command() -> str:
    words = ["cecai-convert", *sys.argv[1:]]
    text = shlex.join(words)
    text = "".join(c if c.isprintable() else "?" for c in text)  # a lock file is data: never echo control chars
    return text if len(text) <= 300 else text[:297] + "..."


def _describe_holder(lock_file: Path) -> str:
    """``run PID 123 (started …, <command>)`` from a lock file, as far as it can be read."""
    try:
        info = json.loads(lock_file.read_text(encoding="utf-8")[:4096])
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return "another run"
    details = [f"started {info['started']}" if isinstance(info.get("started"), str) else ""]
    if isinstance(info.get("host"), str) and info["host"] != socket.gethostname():
        details.append(f"on {info['host']}")
    if isinstance(info.get("command"), str):
        details.append("".join(c if c.isprintable() else "?" for c in info["command"][:300]))
    shown = ", ".join(d for d in details if d)
    return f"run PID {info['pid']}" + (f" ({shown})" if shown else "")


def _lock_timeout() -> float | None:
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise UsageError(
            f"{LOCK_TIMEOUT_ENV}={raw[:40]!r} is not a number of seconds",
            hint=f"set {LOCK_TIMEOUT_ENV} to 0 (never wait), a number of seconds, or unset it (wait as long as needed)",
        )
    return value


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding the exclusive lock on ``path``, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder removes the file when it is done: a lock on a removed file locks nothing.
        try:
            same = os.fstat(fd).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def outputs_lock(
    folder: Path, *, on_wait: Callable[[str], None] | None = None, timeout_s: float | None = None
) -> Iterator[None]:
    """Hold the lock of the outputs folder ``folder`` (created if needed) for the duration of the block.

    When another run holds it, ``on_wait`` is told who (pid, start time, command) and this call waits until that
    run ends. ``timeout_s`` (default: ``$CECAI_LOCK_TIMEOUT``, else no limit) bounds the wait; 0 never waits.

    Raises:
        ConversionFailed: the wait timed out (exit 1); nothing in the folder was touched.
    """
    if timeout_s is None:
        timeout_s = _lock_timeout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = _try_lock(path)
    except OSError as exc:  # a filesystem without locks (some network mounts), or a lock file we may not open
        get_logger("fsutil").warning(
            "could not lock %s (%s): another run on this folder would not be noticed", path, exc.strerror or exc
        )
        yield
        return
    if fd is None:
        holder = _describe_holder(path)
        if timeout_s is not None and timeout_s <= 0:
            raise _busy(holder, folder, timeout_s)
        if on_wait is not None:
            on_wait(f"waiting for {holder} converting into {folder}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.05
        while fd is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise _busy(_describe_holder(path), folder, timeout_s)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            fd = _try_lock(path)
    try:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": _this_command(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a waiter then sees a new file, never a stale record
        os.close(fd)


def _busy(holder: str, folder: Path, timeout_s: float | None) -> ConversionFailed:
    waited = "" if not timeout_s else f" after waiting {timeout_s:g} s"
    return ConversionFailed(
        f"{holder} is converting into {folder}; gave up{waited} ({LOCK_TIMEOUT_ENV}={timeout_s:g})",
        hint=f"let that run finish (or stop it), then re-run; unset {LOCK_TIMEOUT_ENV} to wait for it",
    )


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
    """Remove staging folders (and hidden partial files) left in ``folder`` by runs that were killed.

    Call it only while holding :func:`outputs_lock` on ``folder``: then no other run of this tool is working there.
    """
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


def install_file(src: Path, dest: Path) -> None:
    """Place ``src``'s content at ``dest`` atomically: hard link when possible, else copy, then rename.

    ``src`` stays where it is (a staged file may be installed into several outputs folders).

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
