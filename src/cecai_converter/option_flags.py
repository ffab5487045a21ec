"""The conversion options as command-line flags: :func:`add_arguments` gives the ``run``/``convert``/``demo``
parsers one flag per entry of :data:`cecai_converter.option_table.OPTIONS` (and ``--request``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UsageError
from .option_table import OPTIONS, Command, OptionSpec, from_text

__all__ = ["add_arguments"]


def _arg_type(spec: OptionSpec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if spec.kind in ("path", "imatrix"):
            return text  # resolved by resolve(), against the working directory
        try:
            return from_text(spec, text, spec.flag, Path.cwd())
        except UsageError as exc:
            raise argparse.ArgumentTypeError(exc.message.removeprefix(f"{spec.flag}: ")) from None

    parse.__name__ = spec.kind  # argparse names the type in its "invalid … value" message
    return parse


def add_arguments(parser: argparse.ArgumentParser, command: Command) -> None:
    """Add every option of the table to ``parser`` (each defaults to None: "not given on the command line")."""
    group = parser.add_argument_group(
        "conversion", "each option can also be set by its YAML key or its CECAI_<NAME> variable; the flag wins"
    )
    for spec in OPTIONS:
        help_text = f"{spec.help} [{spec.yaml_key or 'no YAML key'}, {spec.env}]"
        if spec.kind == "switch" and spec.yaml_key is None:  # a one-off (--force): nothing to say no to
            group.add_argument(spec.flag, dest=spec.name, action="store_true", default=None, help=help_text)
        elif spec.kind in ("switch", "bool"):  # --no-… overrides a YAML or variable yes: the flag wins both ways
            group.add_argument(
                spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif spec.kind == "tensor_types":  # repeatable, as llama-quantize's --tensor-type is
            group.add_argument(
                spec.flag, *spec.aliases, dest=spec.name, type=_arg_type(spec), action="append", default=None,
                metavar=spec.metavar, help=help_text,
            )  # fmt: skip
        else:
            group.add_argument(
                spec.flag, dest=spec.name, type=_arg_type(spec), default=None, metavar=spec.metavar, help=help_text
            )
    group.add_argument(
        "--request",
        metavar="FILE|env:NAME",
        help="take every option above from a resolved request (JSON; what the docker backend hands its containers)",
    )
