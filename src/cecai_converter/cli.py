"""``cecai-convert``: the one front door. Parsing and wiring only; the work happens in the pipeline modules.

Each command group lives in its own module and exposes ``register(subparsers)``, which adds its parser and sets
``handler=fn(args, out) -> int``. :func:`main` runs it inside the one error boundary (:func:`errors.boundary`, which
the GitHub Actions adapter shares): a :class:`ConverterError` becomes a clean message and its exit code; anything
else is a bug and keeps its traceback. ``CECAI_DEBUG=1`` shows the traceback of a ``ConverterError`` too.

Exit codes: 0 success, 1 a conversion/tool/check failed, 2 bad input or configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from . import __version__, environment
from .errors import ConverterError, boundary
from .output import LOGGER_NAME, Output

__all__ = ["build_parser", "main"]

# Modules that contribute commands, in the order `--help` lists them.
_COMMAND_MODULES = (
    "cecai_converter.commands",
    "cecai_converter.check",
    "cecai_converter.plan",
    "cecai_converter.release.commands",
    "cecai_converter.signing_commands",
    "cecai_converter.report",
    "cecai_converter.gha",
    "cecai_converter.card_commands",
    "cecai_converter.audit",
    "cecai_converter.doctor",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every command module registered."""
    parser = argparse.ArgumentParser(
        prog="cecai-convert",
        description="Convert Hugging Face models to verified, quantized GGUF files for llama-cpp-python.",
        epilog="Exit codes: 0 success, 1 a conversion or check failed, 2 bad input or configuration, "
        "130 interrupted. Set CECAI_DEBUG=1 for tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tool output (converter, quantizer)")
    parser.add_argument(
        "--format", choices=("human", "json"), default="human", help="result format on stdout (default: human)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    # The global options work after the command too (`cecai-convert convert … --format json`).
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument(
            "--format", choices=("human", "json"), default=argparse.SUPPRESS, help="result format on stdout"
        )
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so every ``finally`` cleans up temporary files."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _configure_logging(verbose: bool) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    if not any(getattr(h, "_cecai_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._cecai_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (never raises for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args.format, verbose=args.verbose)
    _configure_logging(args.verbose)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)

    def report(exc: ConverterError) -> None:
        out.error(exc.message, exc.hint)
        if not environment.is_set(environment.DEBUG):
            print("(set CECAI_DEBUG=1 for the full traceback)", file=out.stderr)

    def interrupted() -> None:
        out.end_progress()
        out.error("interrupted; temporary files were removed")

    try:
        return boundary(lambda: int(args.handler(args, out)), report=report, interrupted=interrupted)
    finally:
        signal.signal(signal.SIGTERM, previous)
