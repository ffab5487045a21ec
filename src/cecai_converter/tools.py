"""Running the llama.cpp tools as child processes: output streamed to the log, a tail kept for errors.

Child processes (not in-process calls) because llama.cpp aborts the whole process on some errors, and because a
blocking C call would not notice Ctrl-C: a child can be stopped and its temporary files removed.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .output import get_logger

__all__ = [
    "MAX_THREADS",
    "ToolRun",
    "WorkerUsage",
    "child_kwargs",
    "failure_summary",
    "quiet_abort_env",
    "run_tool",
    "runtime_env",
    "runtime_name",
    "serve_job",
    "thread_count",
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
    """A finished child process: its exit status and the last lines it printed."""

    returncode: int
    tail: str


def quiet_abort_env() -> dict[str, str]:
    """Environment for a child that runs llama.cpp: an assertion ends it without attaching gdb for a backtrace.

    ggml's abort handler runs gdb on the process; its dozens of trailer lines (``[Inferior 1 … detached]``) would
    push llama.cpp's own message (``GGML_ASSERT(eps >= 0.0f) failed``) out of the error. ``CECAI_DEBUG=1`` keeps
    the backtrace for developers.
    """
    return {} if os.environ.get("CECAI_DEBUG") else {"GGML_NO_BACKTRACE": "1"}


# Lines a debugger or a backtrace adds to a crashed child's output: never the reason it failed.
_NOISE = re.compile(
    r"^(#\d+\s|\[Inferior |\[New (LWP|Thread) |\[Thread debugging|Using host libthread_db|warning: |ptrace: |"
    r"No stack\.|The program is not being run\.|\d+\s+\S+: No such file or directory\.|add-auto-load-safe-path|"
    r"line to your configuration file|To completely disable|For more information about this security|"
    r"\"Auto-loading safe path\"|info \"\(gdb\)|set auto-load|Downloading separate debug info|"
    r"(/\S+/)?lib\S*\.so[.\d]*\(|\S*\(\+0x[0-9a-f]+\)|0x[0-9a-f]+ in )"
)
_ASSERTION = re.compile(r"GGML_ASSERT\(.*\) failed|GGML_ABORT|GGML_ASSERT|terminate called|what\(\):")


def failure_summary(tail: str, lines: int = 3) -> str:
    """The part of a failed child's last output lines that says why: llama.cpp's assertion when there is one
    (file and line, without the build folder), else the last ``lines`` lines that are not debugger noise."""
    kept = [ln.strip() for ln in tail.splitlines() if ln.strip() and not _NOISE.match(ln.strip())]
    asserts = [ln for ln in kept if _ASSERTION.search(ln)]
    if asserts:
        return re.sub(r"^\S*/vendor/llama\.cpp/", "", asserts[-1])[:400]
    return " | ".join(kept[-lines:])[:500] or "(no output)"


def runtime_env(n_gpu_layers: int) -> dict[str, str]:
    """Environment for a llama.cpp worker process that offloads ``n_gpu_layers`` layers.

    With none offloaded the GPUs are hidden: a CUDA build otherwise still moves large matrix products to the GPU,
    so a CPU pair verified or measured on a GPU machine would not be running as its own runtime does.
    """
    return {"CUDA_VISIBLE_DEVICES": ""} if n_gpu_layers == 0 else {}


def runtime_name(n_gpu_layers: int) -> str:
    """What a llama.cpp load offloading ``n_gpu_layers`` layers runs on here: ``cuda`` or ``cpu``.

    The one answer that manifests record (verification ``runtime``, fidelity ``device``) and reuse decisions compare.
    """
    if n_gpu_layers == 0:
        return "cpu"
    import llama_cpp

    return "cuda" if llama_cpp.llama_supports_gpu_offload() else "cpu"


def run_tool(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 60,
) -> ToolRun:
    """Run ``argv``, logging each output line (stdout and stderr merged) at DEBUG level.

    On KeyboardInterrupt (Ctrl-C or SIGTERM) the child is terminated, waited for, and the interrupt re-raised.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    merged_env = {**quiet_abort_env(), **os.environ, **(env or {})}
    with subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=merged_env,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,  # Ctrl-C reaches us only; we stop the child ourselves, then clean up
        **child_kwargs(),  # and a SIGKILL of this process takes the child with it
    ) as proc:
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                _log.debug(line)
                if on_line is not None:
                    on_line(line)
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
    return ToolRun(proc.returncode, "\n".join(tail))


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


class WorkerUsage(Exception):
    """A worker's job cannot be done as asked (a text too short, a vocabulary that does not fit): exit 2."""


def serve_job(job_file: Path, handler: Callable[[Mapping[str, Any]], Mapping[str, Any]]) -> int:
    """The worker side of a JSON job: read the job, run ``handler``, write its result to ``job["result"]``.

    The parent reads ``{"error", "kind": "usage"|"failed"}`` from the same file when the job could not be done; a
    crash inside llama.cpp leaves no file, which the parent reports with the exit status.

    Returns:
        0 on success, 2 for :class:`WorkerUsage`; any other exception is recorded, then re-raised.
    """
    job = json.loads(job_file.read_text(encoding="utf-8"))
    result_file = Path(job["result"])
    try:
        result = handler(job)
    except WorkerUsage as exc:
        result_file.write_text(json.dumps({"error": str(exc), "kind": "usage"}), encoding="utf-8")
        return 2
    except Exception as exc:
        result_file.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}", "kind": "failed"}))
        raise
    result_file.write_text(json.dumps(result), encoding="utf-8")
    return 0
