"""How many CPU threads each worker gets: the one place that decides, for every llama.cpp, quantizer and torch
worker this package starts (through :func:`cecai_converter.processes.run_tool`).

Why it matters: llama-cpp-python's wheel is built with OpenMP (libggml-cpu links libgomp), and by default an
OpenMP thread that waits for work spins on its core for a while instead of sleeping. Two workers that each ask for
every core then slow each other down far more than twice (on a busy 2-core machine, 8 generated tokens of a 135M
model took 2.8 s to 11 s instead of 1.2 s). So:

* **Never more threads than cores, across processes.** A worker's threads are *leased* from the machine: one
  slot file per core under a shared folder (:data:`SLOTS_ENV`, default ``<tmp>/cecai-cores-<uid>``), each held
  with ``flock`` by the worker process itself (the parent passes the locked descriptors to the child and closes
  its own copies), so a lease lasts exactly as long as the worker, is released by the kernel when it dies, and
  counts across every concurrent ``cecai-convert`` run of the user. A worker gets the free cores (at most the
  ones asked for, at least one); with none free it waits for one.
* **A waiting thread sleeps.** Every worker runs with ``OMP_WAIT_POLICY=PASSIVE`` (unless the caller's
  environment sets it): with several workers on one machine a spinning thread steals the core a busy one needs.
  GGML's own threadpool (the non-OpenMP build) is not used by our wheels; its threads also sleep after a short
  spin, and the thread count is the one set here.
* **The worker uses what it was granted.** The grant is passed as :data:`THREADS_ENV` (and ``OMP_NUM_THREADS``,
  ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` for torch and numpy); a job whose ``threads``/``n_threads`` is null
  takes it (:func:`cecai_converter.processes.serve_job` fills it in).

``--threads N`` (THREADS) still decides the thread count of each worker; the lease then takes up to ``N`` slots and
the worker runs ``N`` threads, as the user asked. ``CECAI_CORE_SLOTS=off`` turns the machine-wide lease off (each
worker then gets every core, as before).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Final

from . import environment
from .output import get_logger

__all__ = [
    "CORES_ENV",
    "SLOTS_ENV",
    "THREADS_ENV",
    "CoreLease",
    "grant",
    "lease_cores",
    "machine_cores",
    "slots_folder",
    "worker_env",
    "worker_threads",
]

#: The number of cores to share, when the machine's own count is not what this run should use (a container's CPU
#: quota it cannot see, a machine shared with other work).
CORES_ENV: Final = environment.CORES
#: The threads a worker was granted, set by the parent for the child.
THREADS_ENV: Final = environment.THREADS
#: The folder of the machine-wide core slots; ``off`` turns the lease off.
SLOTS_ENV: Final = environment.CORE_SLOTS
#: Seconds between two looks for a free core while every one is leased.
_POLL_S: Final = 0.2

_log = get_logger("threads")


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Cores allowed by a cgroup v2 CPU quota (``max 100000``: none), rounded up; None when there is no quota."""
    try:
        quota, period = path.read_text(encoding="ascii").split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def machine_cores(environ: Mapping[str, str] | None = None) -> int:
    """The cores this process may use: :data:`CORES_ENV` when set, else the CPU affinity mask, bounded by a cgroup
    CPU quota (a container limited to 2 CPUs on a 64-core host gets 2, not 64)."""
    env = os.environ if environ is None else environ
    text = env.get(CORES_ENV, "").strip()
    if text:
        with contextlib.suppress(ValueError):
            if int(text) >= 1:
                return int(text)
        _log.warning("%s=%r is not a whole number of cores above 0; it is ignored", CORES_ENV, text[:40])
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def grant(requested: int | None, cores: int, free: int) -> tuple[int, int]:
    """What one worker gets: ``(slots to hold, threads to run)``.

    Pure: ``requested`` is the user's ``--threads`` (None: not given), ``cores`` the machine's, ``free`` the
    cores no other worker holds now. Without a request a worker runs as many threads as it holds: the free cores,
    at least one (it waits for one when none is free; see :func:`lease_cores`). With one it runs the requested
    count and holds as many of the free cores as that covers (at least one).
    """
    if cores < 1 or free < 0 or (requested is not None and requested < 1):
        raise ValueError(f"grant({requested}, {cores}, {free}): cores must be >= 1, free >= 0, requested >= 1")
    held = max(1, min(free, cores, requested or cores))
    return held, requested or held


def worker_env(threads: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a worker running ``threads`` threads gets (added to its environment).

    Pure apart from reading ``environ`` (default ``os.environ``): a wait policy the caller set on purpose is kept.
    """
    env = os.environ if environ is None else environ
    n = str(threads)
    return {
        THREADS_ENV: n,
        "OMP_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY") or "PASSIVE",
    }


def worker_threads(value: object = None, environ: Mapping[str, str] | None = None) -> int:
    """In a worker: the threads to run. ``value`` (the job's own count) when it is a whole number above 0, else
    what the parent granted (:data:`THREADS_ENV`), else the machine's cores."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    env = os.environ if environ is None else environ
    with contextlib.suppress(ValueError):
        if int(env.get(THREADS_ENV, "")) >= 1:
            return int(env[THREADS_ENV])
    return machine_cores(env)


def slots_folder(environ: Mapping[str, str] | None = None) -> Path | None:
    """The folder of the core slots (None: the lease is off)."""
    env = os.environ if environ is None else environ
    text = env.get(SLOTS_ENV, "").strip()
    if text.lower() == "off":
        return None
    return Path(text) if text else Path(tempfile.gettempdir()) / f"cecai-cores-{os.getuid()}"


class CoreLease:
    """Cores held for one worker: ``fds`` are locked slot files to pass to the child (``pass_fds``); ``threads``
    is what the child runs. :meth:`release` closes this process's copies (the child keeps the locks alive)."""

    def __init__(self, fds: list[int], threads: int) -> None:
        self.fds = fds
        self.threads = threads

    def release(self) -> None:
        """Close this process's descriptors; the locks go when the last holder (the child) closes its own."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _open_slot(folder: Path, index: int) -> int:
    # O_NOFOLLOW: a link planted at a slot's name is not followed (the folder is ours, 0700, but /tmp is shared)
    return os.open(folder / f"core-{index}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _try_slots(folder: Path, cores: int, want: int) -> list[int]:
    held: list[int] = []
    for index in range(cores):
        if len(held) >= want:
            break
        fd = _open_slot(folder, index)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            continue
        held.append(fd)
    return held


@contextlib.contextmanager
def lease_cores(
    requested: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    on_wait: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[CoreLease]:
    """Lease cores for one worker (see the module docstring); the caller starts the child with ``pass_fds=fds``
    inside the block. With the lease off (:data:`SLOTS_ENV` ``off``, or a slot folder that cannot be made) the
    worker gets ``requested`` or every core and holds nothing.
    """
    env = os.environ if environ is None else environ
    cores = machine_cores(env)
    folder = slots_folder(env)
    if folder is not None:
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                raise OSError(f"{folder} is not a folder of this user")
        except OSError as exc:
            _log.warning("core slots in %s cannot be used (%s): workers run without a machine-wide lease", folder, exc)
            folder = None
    if folder is None:
        lease = CoreLease([], requested or cores)
    else:
        want = grant(requested, cores, cores)[0]
        fds = _try_slots(folder, cores, want)
        waited = False
        while not fds:
            if not waited and on_wait is not None:
                on_wait(f"waiting for a free core: all {cores} are used by other workers (cecai-convert runs)")
            waited = True
            sleep(_POLL_S)
            fds = _try_slots(folder, cores, want)
        lease = CoreLease(fds, grant(requested, cores, len(fds))[1])
    try:
        yield lease
    finally:
        lease.release()


def _probe(job: Mapping[str, object]) -> dict[str, object]:
    """A worker that reports what it was given (the tests and ``benchmarks/checks.py`` use it): its job's thread
    count after :func:`cecai_converter.processes.serve_job` filled it in, the variables, the slot files it holds, and
    the thread count the OpenMP runtime llama.cpp links (libgomp) will use."""
    import ctypes
    import ctypes.util

    folder = slots_folder()
    held: list[str] = []
    with contextlib.suppress(OSError):
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):
                target = fd.readlink()
                if folder is not None and target.parent == folder:
                    held.append(target.name)
    omp: int | None = None
    with contextlib.suppress(OSError, AttributeError):
        gomp = ctypes.CDLL(ctypes.util.find_library("gomp") or "libgomp.so.1")
        omp = int(gomp.omp_get_max_threads())
    names = (THREADS_ENV, "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {
        "threads": job.get("threads"),
        "env": {name: os.environ.get(name) for name in names},
        "held": sorted(held),
        "omp_max_threads": omp,
    }


if __name__ == "__main__":
    import sys

    from .processes import serve_job

    sys.exit(serve_job(_probe))
