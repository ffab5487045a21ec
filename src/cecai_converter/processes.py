"""Child processes: tools (the converter, llama-imatrix, pip) and workers (this package's own llama.cpp jobs).

Child processes (not in-process calls) because llama.cpp aborts the whole process on some errors, leaks memory, and
because a blocking C call would not notice Ctrl-C: a child can be stopped and its temporary files removed.

* :func:`run_tool` runs any command: output streamed to the log with a tail kept for errors, the child in its own
  process group (stopped with everything it started on Ctrl-C or at a time limit) and killed with this process.
* :func:`run_worker` / :func:`serve_job` are the one worker protocol on top of it: the parent writes a JSON job,
  runs ``python -m <module> --job FILE --result FILE``, and reads the JSON result the child wrote atomically; a
  child that crashed, refused the job or ran out of time becomes a :class:`WorkerFailed`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Final

from . import environment
from .errors import WorkerFailed, WorkerFailure
from .fsutil import atomic_write_text
from .output import get_logger
from .threads import CoreLease, lease_cores, worker_env, worker_threads

__all__ = [
    "MAX_THREADS",
    "THREAD_KEYS",
    "ToolRun",
    "WorkerFailed",
    "WorkerResult",
    "WorkerUsage",
    "child_kwargs",
    "describe_exit",
    "failure_summary",
    "quiet_abort_env",
    "run_tool",
    "run_worker",
    "serve_job",
    "thread_count",
    "worker_failure_why",
]

_log = get_logger("tools")

_PR_SET_PDEATHSIG = 1
#: llama.cpp's GGML_MAX_N_THREADS: ggml has room for no more threads than this
MAX_THREADS = 512


def thread_count(text: str) -> int:
    """The ``--threads`` argument type: a whole number of threads from 1 to :data:`MAX_THREADS`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number of threads") from None
    if not 1 <= value <= MAX_THREADS:
        cores = os.cpu_count() or 1
        raise argparse.ArgumentTypeError(
            f"{value} threads: give 1 to {MAX_THREADS} (llama.cpp's limit); this machine has {cores} cores, "
            "and leaving --threads out uses them all"
        )
    return value


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Resolved once in the parent: the function that runs between fork and exec only calls it.
_PRCTL = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when the thread that started it dies (``kill -9`` of the CLI
    included), so that no converter or llama.cpp worker outlives the run and keeps writing into its staging folder.

    The parent-death signal survives ``exec`` (not for set-user-ID programs, which none of ours is). A parent that
    died between ``fork`` and ``prctl`` is caught by comparing the parent pid.
    """

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def child_kwargs() -> dict[str, Any]:
    """Keyword arguments for every ``subprocess`` call that starts a long-running child (converter, llama.cpp
    workers, builds): on Linux the child dies with this process, even when this process is killed with SIGKILL and
    cannot clean up. Elsewhere an empty dict (the process group and Ctrl-C handling still stop children)."""
    if _PRCTL is None:
        return {}
    return {"preexec_fn": _die_with_parent(os.getpid())}


@dataclass(frozen=True)
class ToolRun:
    """A finished child process: its exit status, the last lines it printed, and whether it was stopped because
    it ran past its time limit (its exit status is then the signal that stopped it)."""

    returncode: int
    tail: str
    timed_out: bool = False


def quiet_abort_env() -> dict[str, str]:
    """Environment for a child that runs llama.cpp: an assertion ends it without attaching gdb for a backtrace.

    ggml's abort handler runs gdb on the process; its dozens of trailer lines (``[Inferior 1 … detached]``) would
    push llama.cpp's own message (``GGML_ASSERT(eps >= 0.0f) failed``) out of the error. ``CECAI_DEBUG=1`` keeps
    the backtrace for developers.
    """
    return {} if environment.is_set(environment.DEBUG) else {"GGML_NO_BACKTRACE": "1"}


# Lines a debugger or a backtrace adds to a crashed child's output: never the reason it failed.
_NOISE = re.compile(
    r"^(#\d+\s|\[Inferior |\[New (LWP|Thread) |\[Thread debugging|Using host libthread_db|warning: |ptrace: |"
    r"No stack\.|The program is not being run\.|\d+\s+\S+: No such file or directory\.|add-auto-load-safe-path|"
    r"line to your configuration file|To completely disable|For more information about this security|"
    r"\"Auto-loading safe path\"|info \"\(gdb\)|set auto-load|Downloading separate debug info|"
    r"(/\S+/)?lib\S*\.so[.\d]*\(|\S*\(\+0x[0-9a-f]+\)|0x[0-9a-f]+ in )"
)
_ASSERTION = re.compile(r"GGML_ASSERT\(.*\) failed|GGML_ABORT|GGML_ASSERT|terminate called|what\(\):")


def worker_failure_why(exc: WorkerFailed, *, progress_prefix: str) -> str:
    """Why a runtime worker failed, for a message: ``exit N): <why>``; for a crash, llama.cpp's own last words
    without the worker's progress lines (those starting with ``progress_prefix``); else the worker's reason."""
    if exc.kind == "crashed":
        said = "\n".join(ln for ln in exc.output_tail.splitlines() if not ln.startswith(progress_prefix))
        return f"exit {exc.return_code}): {failure_summary(said)}"
    return f"exit {exc.return_code}): {exc.reason}"


def failure_summary(tail: str, lines: int = 3) -> str:
    """The part of a failed child's last output lines that says why: llama.cpp's assertion when there is one
    (file and line, without the build folder), else the last ``lines`` lines that are not debugger noise."""
    kept = [ln.strip() for ln in tail.splitlines() if ln.strip() and not _NOISE.match(ln.strip())]
    asserts = [ln for ln in kept if _ASSERTION.search(ln)]
    if asserts:
        return re.sub(r"^\S*/vendor/llama\.cpp/", "", asserts[-1])[:400]
    return " | ".join(kept[-lines:])[:500] or "(no output)"


def run_tool(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 60,
    timeout: float | None = None,
    cwd: Path | None = None,
    cores: CoreLease | None = None,
) -> ToolRun:
    """Run ``argv``, logging each output line (stdout and stderr merged) at DEBUG level.

    The child leads its own process group. On KeyboardInterrupt (Ctrl-C or SIGTERM) the group is terminated,
    waited for, and the interrupt re-raised. Past ``timeout`` seconds the group is terminated (killed if it has
    not ended within :data:`_GRACE_S`) and the result says ``timed_out``.

    Args:
        argv: the command line.
        env: variables added to this process's environment (after :func:`quiet_abort_env`).
        on_line: called with each output line as it arrives (progress).
        tail_lines: how many of the last lines to keep.
        timeout: seconds before the child and everything it started are stopped; ``None``: no limit.
        cwd: the child's working folder.
        cores: the cores leased for the child (:func:`cecai_converter.threads.lease_cores`): its slot locks pass
            to the child, which holds them until it ends (this process's copies are closed once it started), and
            it runs with :func:`cecai_converter.threads.worker_env` (its thread count, a passive OpenMP wait).
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    shared = worker_env(cores.threads) if cores is not None else {}
    merged_env = {**quiet_abort_env(), **os.environ, **shared, **(env or {})}
    expired = threading.Event()
    with subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=merged_env,
        cwd=cwd,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,  # Ctrl-C reaches us only; we stop the child's group ourselves, then clean up
        pass_fds=tuple(cores.fds) if cores is not None else (),
        **child_kwargs(),  # and a SIGKILL of this process takes the child with it
    ) as proc:
        if cores is not None:
            cores.release()  # the child holds the cores now: they are free again the moment it ends
        timers = _deadline(proc.pid, timeout, expired)
        try:
            assert proc.stdout is not None
            # The pipe closes when the last process holding it ends: after a timeout that is the whole group.
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                _log.debug(line)
                if on_line is not None:
                    on_line(line)
            if expired.is_set():
                # Before the leader is reaped its pid cannot name another group: what is left of it dies now.
                _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            for timer in timers:
                timer.cancel()
    return ToolRun(proc.returncode, "\n".join(tail), timed_out=expired.is_set())


#: Seconds a stopped child's group gets between SIGTERM and SIGKILL.
_GRACE_S = 5.0


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _deadline(pgid: int, timeout: float | None, expired: threading.Event) -> list[threading.Timer]:
    """Timers that stop the group ``pgid`` at ``timeout``: SIGTERM, then SIGKILL :data:`_GRACE_S` later."""
    if timeout is None:
        return []

    def terminate() -> None:
        expired.set()
        _signal_group(pgid, signal.SIGTERM)

    timers = [
        threading.Timer(timeout, terminate),
        threading.Timer(timeout + _GRACE_S, _signal_group, (pgid, signal.SIGKILL)),
    ]
    for timer in timers:
        timer.daemon = True
        timer.start()
    return timers


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Whatever the child started and left behind (a grandchild that ignores SIGTERM) goes too.
    _signal_group(proc.pid, signal.SIGKILL)


def describe_exit(code: int) -> str:
    """A child's exit status in words: the signal that killed it (named), or the status it exited with."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (llama.cpp aborted or ran out of memory)"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


# --- the worker protocol ----------------------------------------------------------------------------------------


class WorkerUsage(Exception):
    """A worker's job cannot be done as asked (a text too short, a vocabulary that does not fit): exit 2."""


@dataclass(frozen=True)
class WorkerResult:
    """A worker's JSON result, its last output lines and how long it ran."""

    data: dict[str, Any]
    tail: str
    seconds: float


def _json_default(value: object) -> str:
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"a worker job holds only JSON values and paths, not {type(value).__name__}")


def run_worker(
    module: str,
    job: Mapping[str, Any],
    *,
    timeout: float | None,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 60,
    threads: int | None = None,
) -> WorkerResult:
    """Run ``job`` in a worker process: ``python -m <module> --job FILE --result FILE``, served by :func:`serve_job`.

    The job and the result live in a temporary folder removed afterwards; the child runs through :func:`run_tool`
    (its own process group, its output in the log, a tail kept, killed with this process).

    Args:
        module: the worker's module (``cecai_converter.verify``); its ``__main__`` calls :func:`serve_job`.
        job: JSON values (paths are written as strings).
        timeout: seconds before the worker and every process it started are stopped; ``None``: no limit.
        name: the worker's name in messages (default: the module's last part).
        env: variables for the child (e.g. :func:`cecai_converter.runtime.runtime_env`).
        on_line: called with each output line (progress).
        tail_lines: output lines kept for the error.
        threads: the user's ``--threads`` (None: the free cores, see :mod:`cecai_converter.threads`); the worker
            is given cores from the machine-wide lease either way, and a null ``threads``/``n_threads`` in its job
            becomes the count it was granted (:func:`serve_job`).

    Returns:
        the job's result (a JSON object), the output tail and the run time.

    Raises:
        WorkerFailed: the worker refused the job, failed, crashed or ran out of time.
        TypeError: the job holds a value that is neither JSON nor a path (a bug in the caller; nothing started).
    """
    label = name or module.rsplit(".", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="cecai-worker-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job, default=_json_default), encoding="utf-8")
        argv = [sys.executable, "-m", module, "--job", str(job_file), "--result", str(result_file)]
        with lease_cores(threads, on_wait=_log.info) as cores:
            started = time.monotonic()
            run = run_tool(argv, env=env, on_line=on_line, tail_lines=tail_lines, timeout=timeout, cores=cores)
            seconds = time.monotonic() - started
        reply, unreadable = _read_reply(result_file)

    def failed(kind: WorkerFailure, reason: str, tail: str = run.tail, hint: str | None = None) -> WorkerFailed:
        summary = failure_summary(tail) if tail.strip() else ""
        shown = f" ({summary})" if summary and kind != "usage" else ""
        return WorkerFailed(
            f"{label}: {reason}{shown}",
            worker=label,
            kind=kind,
            reason=reason,
            summary=summary,
            return_code=run.returncode,
            output_tail=run.tail,
            hint=hint or "the worker's full output is in the log; run with -v to see it live",
        )

    if run.timed_out:
        raise failed(
            "timeout",
            f"the worker did not finish within {timeout:g} s and was stopped, with every process it started",
            hint="allow it more time, give it less work, or offload layers to a GPU",
        )
    if reply is not None and reply.get("ok") is True and run.returncode == 0 and isinstance(reply.get("result"), dict):
        return WorkerResult(reply["result"], run.tail, seconds)
    if reply is not None and reply.get("ok") is False:
        kind: WorkerFailure = "usage" if reply.get("kind") == "usage" else "failed"
        # The job's error is the reason; the traceback serve_job printed after it says nothing more to a user.
        before = run.tail.split(_TRACEBACK, 1)[0]
        raise failed(kind, str(reply.get("error") or "no reason given"), tail=before)
    if unreadable:
        reason = f"the worker's result file holds no result ({unreadable}); the worker {describe_exit(run.returncode)}"
        raise failed("crashed", reason)
    if run.returncode == 0:
        raise failed("crashed", "the worker exited without writing its result")
    raise failed("crashed", f"the worker {describe_exit(run.returncode)}")


_TRACEBACK = "Traceback (most recent call last):"

#: The keys a job names its thread count with; null means "what the parent granted" (:func:`_granted`).
THREAD_KEYS: Final = ("threads", "n_threads")


def _granted(job: Any) -> Any:
    """The job with a null ``threads``/``n_threads`` replaced by the threads this worker was granted
    (:func:`cecai_converter.threads.worker_threads`): one rule for every worker, so no worker falls back to its
    library's own default (llama-cpp-python's is every core for prompt processing)."""
    if not isinstance(job, dict):
        return job

    return {**job, **{key: worker_threads() for key in THREAD_KEYS if key in job and job[key] is None}}


def _read_reply(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The worker's reply and, when the file exists but is no reply, why."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, ""
    except (OSError, UnicodeDecodeError) as exc:
        return None, str(exc)[:200]
    try:
        reply = json.loads(text)
    except ValueError as exc:
        return None, f"{exc}"[:200]
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return None, "no 'ok' field"
    return reply, ""


def serve_job(handler: Callable[[Mapping[str, Any]], Mapping[str, Any]], argv: Sequence[str] | None = None) -> int:
    """The worker side of :func:`run_worker`: read ``--job``, run ``handler``, write its result to ``--result``.

    The reply is written atomically (a crash leaves no half-written file): ``{"ok": true, "result": {...}}``, or
    ``{"ok": false, "kind": "usage"|"failed", "error": "..."}`` when the job could not be done. A crash inside
    llama.cpp leaves no file, which the parent reports with the exit status.

    Returns:
        0 on success, 2 for :class:`WorkerUsage`; any other exception is recorded, then re-raised (its traceback
        goes to the log).
    """
    parser = argparse.ArgumentParser(description="a cecai-converter worker: one JSON job in, one JSON result out")
    parser.add_argument("--job", type=Path, required=True, help="the job, written by the parent")
    parser.add_argument("--result", type=Path, required=True, help="where the result goes")
    args = parser.parse_args(argv)
    job = _granted(json.loads(args.job.read_text(encoding="utf-8")))
    try:
        result = handler(job)
    except WorkerUsage as exc:
        atomic_write_text(args.result, json.dumps({"ok": False, "kind": "usage", "error": str(exc)}))
        return 2
    except Exception as exc:
        reply = {"ok": False, "kind": "failed", "error": f"{type(exc).__name__}: {exc}"}
        atomic_write_text(args.result, json.dumps(reply))
        raise
    atomic_write_text(args.result, json.dumps({"ok": True, "result": dict(result)}))
    return 0
