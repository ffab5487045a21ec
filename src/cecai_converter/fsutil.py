"""Files that appear whole or not at all.

Work happens in a staging folder inside the outputs folder (same filesystem, so the final move is an atomic
rename; :func:`install_file`). Nothing half-written ever sits at a final path: a file is written under a hidden
temporary name and renamed into place. That name is fresh and unpredictable, created exclusively without following
a link, and a symbolic link at a final name is refused (:func:`refuse_symlink`, the one rule for links; see the
comment above it). Staging folders carry the owner's pid; a later run removes those whose owner
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
import secrets
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from . import environment
from .errors import ConversionFailed, SymlinkRefused, UsageError
from .output import get_logger

__all__ = [
    "GGUF_LINK_RULE",
    "LOCK_NAME",
    "LOCK_TIMEOUT_ENV",
    "STAGING_PREFIX",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "install_file",
    "outputs_lock",
    "refuse_symlink",
    "refuse_unsafe_target",
    "remove_stale_staging",
    "sha256_file",
    "staging_dir",
    "write_target",
]

STAGING_PREFIX = ".cecai-tmp-"
LOCK_NAME = ".cecai.lock"
#: seconds a run waits for another run's lock on its outputs folder before it gives up (exit 1); unset: no limit
LOCK_TIMEOUT_ENV = environment.LOCK_TIMEOUT


def _this_command() -> str:
    words = ["cecai-convert", *sys.argv[1:]]
    text = shlex.join(words)
    text = "".join(c if c.isprintable() else "?" for c in text)  # a lock file is data: never echo control chars
    return text if len(text) <= 300 else text[:297] + "..."


def _describe_holder(lock_file: Path) -> str:
    """``run PID 123 (started …, <command>)`` from a lock file, as far as it can be read."""
    try:
        info = json.loads(lock_file.read_text(encoding="utf-8")[:4096])
    except (OSError, ValueError, RecursionError):  # anyone may write the lock file: 4 KiB of `[` is too deep
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
    raw = (environment.text(LOCK_TIMEOUT_ENV) or "").strip()
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


# --- symbolic links: the one rule -------------------------------------------------------------------------------
#
# A folder the user names (OUTDIR, --plot DIR, the folder of -o FILE) may be reached through symbolic links: that is
# the user's choice, and it is resolved once so that every message names the folder the files really go to. A file
# *inside* such a folder is never a link: a link there was planted by someone else (an artifact, a shared folder)
# or left by a tool, and following it would read or write a file outside the folder while the message names the
# folder. So every file this tool writes is created under a fresh, unpredictable name with O_EXCL | O_NOFOLLOW and
# renamed into place, a link at the final name is refused, and a model file (GGUF) that is a link is refused by
# every command that reads one (check, sign, publish, verify, report).

#: why a GGUF that is a symbolic link is refused (sign and publish always did; now every command that reads one)
GGUF_LINK_RULE = "model files are read as regular files only, never through a symbolic link"


def refuse_symlink(path: Path, *, why: str = GGUF_LINK_RULE, where: str = "", hint: str | None = None) -> None:
    """Refuse ``path`` when it is a symbolic link (dangling or not); the one check every reader of a model file
    (GGUF) and every writer of a final file uses.

    Args:
        path: the file; only its last component is looked at (the folders above it are the caller's choice).
        why: the rule, after ``"<path> is a symbolic link; "``.
        where: a prefix for the message (for example ``"<manifest>: files[0]: "``).
        hint: what to do; default: replace the link by the file it points to.

    Raises:
        SymlinkRefused: ``path`` is a symbolic link (exit 2).
    """
    if path.is_symlink():
        raise SymlinkRefused(
            f"{where}{path} is a symbolic link; {why}",
            hint=hint or f"replace the link {path} by a copy of the file it points to, or remove it",
        )


def write_target(path: Path) -> Path:
    """``path`` made absolute with its folder resolved and its own name kept (never resolved).

    Resolving the whole path would follow a link planted at the file's own name and write wherever it points; this
    keeps the name, so the safe writers below see (and refuse) such a link, and a message naming the result names
    the file that is written.

    Raises:
        UsageError: ``path`` names no file (``/``, ``..``).
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise UsageError(f"{path} names a folder, not a file to write", hint="give a file name")
    return path.parent.resolve() / path.name


def refuse_unsafe_target(path: Path) -> None:
    """Refuse to replace ``path`` when it is a link (planted) or not a regular file (a folder, a FIFO...).

    The safe writers check this themselves (twice: before writing and right before the rename); a command calls it
    first too, to refuse before it does any work.

    Raises:
        SymlinkRefused: ``path`` is a symbolic link (exit 2).
        UsageError: ``path`` is a folder or another non-regular file.
    """
    refuse_symlink(
        path,
        why=f"refusing to write through it: a link planted where this tool writes would send the write outside "
        f"{path.parent}; nothing was written",
        hint=f"remove the link {path} (this tool never makes one) and re-run",
    )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(
            f"{path} exists and is not a regular file (a folder or a device); nothing was written",
            hint=f"move {path} away and re-run",
        )


_TEMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _temp_name(dest: Path) -> Path:
    """A fresh, unpredictable hidden name next to ``dest`` (a pre-planted ``.<name>.partial`` is never used)."""
    return dest.parent / f".{dest.name[:200]}.{secrets.token_hex(8)}.partial"


def _create_temp(dest: Path) -> tuple[int, Path]:
    """A new temporary file next to ``dest``, created exclusively (never through a link): its descriptor and path."""
    for _ in range(64):
        tmp = _temp_name(dest)
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o644), tmp
        except FileExistsError:  # 64 random bits taken: someone is guessing, or very unlucky; draw again
            continue
    raise ConversionFailed(f"could not create a temporary file next to {dest}: every name tried was taken")


def _place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` over ``dest`` (same folder), refusing a link planted at ``dest`` meanwhile."""
    refuse_unsafe_target(dest)
    os.replace(tmp, dest)


def _unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def install_file(src: Path, dest: Path) -> None:
    """Place ``src``'s content at ``dest`` atomically: hard link when possible, else copy, then rename.

    ``src`` stays where it is (a staged file may be installed into several outputs folders). The temporary name is
    fresh and unpredictable, created exclusively; a symbolic link at ``dest`` is refused, never followed.

    Raises:
        SymlinkRefused: ``dest`` is a symbolic link (exit 2); nothing was written.
        UsageError: ``dest`` is a folder or another non-regular file.
        ConversionFailed: the disk filled up (the partial copy is removed).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    refuse_unsafe_target(dest)
    tmp: Path | None = None
    try:
        for _ in range(64):
            candidate = _temp_name(dest)
            try:
                os.link(src, candidate)  # link(2) never follows or replaces an existing `candidate`
            except FileExistsError:
                continue
            except OSError:  # another filesystem, or links not allowed: copy into a fresh file
                fd, tmp = _create_temp(dest)
                with os.fdopen(fd, "wb") as out, src.open("rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
                    out.flush()
                    os.fsync(out.fileno())
            else:
                tmp = candidate
            break
        if tmp is None:
            raise ConversionFailed(f"could not create a temporary file next to {dest}: every name tried was taken")
        _place(tmp, dest)
        tmp = None
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(exc, dest) from None
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: a fresh temporary file (exclusive, no link followed), fsync, rename in place.

    Every final file this tool writes into a folder goes through here (or :func:`install_file`).

    Raises:
        SymlinkRefused: ``path`` is a symbolic link (exit 2); nothing was written.
        UsageError: ``path`` is a folder or another non-regular file.
        ConversionFailed: the disk filled up (nothing partial is left).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_unsafe_target(path)
    tmp: Path | None = None
    try:
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        _place(tmp, path)
        tmp = None
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(exc, path) from None
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` safely: see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON safely: see :func:`atomic_write_bytes`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
