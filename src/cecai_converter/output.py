"""Where things are printed: results to stdout, everything else (logs, progress, errors) to stderr.

Keeping the two apart lets ``--format json`` output be piped into another program while progress still shows.
Progress lines redraw in place only on a terminal, and ``CECAI_NO_PROGRESS=1`` turns them off.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from . import environment

__all__ = ["LOGGER_NAME", "Output", "decimal_size", "get_logger"]

LOGGER_NAME = "cecai"


def decimal_size(n: float) -> str:
    """A byte count as people read file sizes on release pages and the Hub: ``812 B``, ``17.9 MB``, ``4.1 GB``."""
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def get_logger(name: str | None = None) -> logging.Logger:
    """The project's logger (or a child of it); handlers are attached by the CLI and per-pair log files."""
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


class Output:
    """The one object commands print through.

    Args:
        fmt: ``human`` or ``json``. In JSON mode only :meth:`result` writes to stdout, once, as JSON.
        verbose: also show tool output (converter, quantizer) on stderr.
        stdout, stderr: streams, replaceable in tests.
    """

    def __init__(
        self,
        fmt: str = "human",
        *,
        verbose: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.fmt = fmt
        self.verbose = verbose
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        isatty = getattr(self.stderr, "isatty", lambda: False)()
        self.progress_enabled = isatty and fmt == "human" and not environment.is_set(environment.NO_PROGRESS)

    def result(self, human: str, data: Any = None) -> None:
        """Print a command's result: ``human`` text, or ``data`` as JSON in JSON mode."""
        if self.fmt == "json":
            json.dump(data, self.stdout, indent=2, sort_keys=True, default=str)
            self.stdout.write("\n")
        else:
            self.stdout.write(human if human.endswith("\n") else human + "\n")
        self.stdout.flush()

    def info(self, message: str) -> None:
        """A log line for people, on stderr."""
        print(message, file=self.stderr, flush=True)

    def warning(self, message: str) -> None:
        """A non-fatal problem, on stderr."""
        print(f"warning: {message}", file=self.stderr, flush=True)

    def error(self, message: str, hint: str | None = None) -> None:
        """A fatal problem and what to do about it, on stderr."""
        print(f"error: {message}", file=self.stderr, flush=True)
        if hint:
            print(f"hint: {hint}", file=self.stderr, flush=True)

    def progress(self, message: str) -> None:
        """A transient status line: redrawn in place on a terminal, otherwise not shown (the log has it)."""
        if self.progress_enabled:
            self.stderr.write("\r\033[K" + message[:150])
            self.stderr.flush()

    def end_progress(self) -> None:
        """Clear the transient status line."""
        if self.progress_enabled:
            self.stderr.write("\r\033[K")
            self.stderr.flush()

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        """Announce a long step on stderr and report its duration."""
        start = time.perf_counter()
        self.info(f"==> {title}")
        try:
            yield
        finally:
            self.end_progress()
        self.info(f"    done in {time.perf_counter() - start:.1f}s")
