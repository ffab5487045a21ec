"""``cecai-convert doctor`` (:func:`register`) and ``python -m cecai_converter.doctor`` (:func:`main`, runnable
before the package's dependencies are installed): the same options, the same report, exit 0 / 1 / 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import EXIT_FAILED, EXIT_OK, ConverterError, boundary
from ..output import Output
from ..pairs import PAIRS, parse_pair
from .diagnosis import ROLES, Report, diagnose
from .probes import parse_size
from .render import escape_data, escape_property, github_lines, human_table


# -- the command -----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The doctor's options (shared by ``cecai-convert doctor`` and ``python -m cecai_converter.doctor``)."""
    p.add_argument("--role", choices=ROLES, default="builder", help="what the runner does (default: builder)")
    p.add_argument(
        "--pair", metavar="PAIR",
        help=f"the hardware pair ({', '.join(PAIRS)}, or their slugs); required for --role check",
    )  # fmt: skip
    p.add_argument(
        "--backend", choices=("local", "docker"),
        help="how the runner converts or checks (default: local for a builder, docker for a check runner)",
    )  # fmt: skip
    p.add_argument(
        "--model-size", metavar="SIZE",
        help="the model's weights size (16GB, 1.5GiB, 800MB) for the disk check: a builder needs 4x it + 3 GB, a "
        "check runner 2x it + 1 GB; without it only the fixed part is checked",
    )  # fmt: skip
    p.add_argument("--path", type=Path, help="where the runner works, for the disk check (default: here)")
    p.add_argument("--image", help="the image a docker backend runs (default: the pair's default tag)")
    p.add_argument(
        "--skip", action="append", default=[], metavar="CHECK",
        help="a check not to run, repeatable (e.g. --skip 'python venv' where nothing is installed)",
    )  # fmt: skip
    p.add_argument(
        "--github", action="store_true",
        help="print GitHub workflow commands: ::error per missing piece, ::warning per unchecked one",
    )  # fmt: skip


def _report_from(args: argparse.Namespace) -> Report:
    pair = parse_pair(args.pair) if args.pair else None
    size = parse_size(args.model_size) if args.model_size else None
    return diagnose(
        args.role, pair, backend=args.backend, model_bytes=size, path=args.path, image=args.image, skip=args.skip
    )


def _emit(report: Report, args: argparse.Namespace, write: Callable[[str, Any], None]) -> int:
    text = github_lines(report) if args.github else human_table(report)
    write(text, report.to_json())
    return EXIT_OK if report.passed else EXIT_FAILED


def _cmd_doctor(args: argparse.Namespace, out: Output) -> int:
    def write(text: str, data: Any) -> None:
        if args.github:  # workflow commands, whatever --format says: the runner reads them from stdout
            print(text, file=out.stdout, flush=True)
        else:
            out.result(text, data)

    return _emit(_report_from(args), args, write)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``doctor`` to the CLI."""
    p = sub.add_parser(
        "doctor",
        help="check this runner for what its role and pair need (compilers, cmake, engine, image, GPU, disk)",
        description="Check this machine for a builder (Python with venv, C/C++ compiler, cmake, disk) or a check "
        "runner (container engine, the pair's image, GPU and NVIDIA runtime for the GPU and Jetson pairs, disk). "
        "Prints a table with a fix per missing piece. Exit 0: ready; 1: something is missing; 2: bad usage. "
        "docs/runners.md lists each pair's runner labels and needs.",
    )
    add_arguments(p)
    p.set_defaults(handler=_cmd_doctor)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cecai_converter.doctor``: the same command, runnable before the package's dependencies are
    installed (the actions run it from their source with the runner's Python)."""
    parser = argparse.ArgumentParser(
        prog="python -m cecai_converter.doctor",
        description="cecai-convert doctor, runnable before cecai-converter's dependencies are installed.",
    )
    add_arguments(parser)
    parser.add_argument("--format", choices=("human", "json"), default="human", help="result format on stdout")
    args = parser.parse_args(argv)

    def write(text: str, data: Any) -> None:
        if args.format == "json" and not args.github:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            print(text, flush=True)

    def report(exc: ConverterError) -> None:
        if args.github:
            print(f"::error title={escape_property('cecai-converter doctor: ' + exc.title)}::"
                  f"{escape_data(exc.message + (f'. {exc.hint}' if exc.hint else ''))}")  # fmt: skip
        else:
            print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)

    return boundary(lambda: _emit(_report_from(args), args, write), report=report, interrupted=lambda: None)
