"""One typed request: the conversion options resolved once, from every source, and recorded in the manifest.

The options themselves are one table (:data:`cecai_converter.option_table.OPTIONS`); their flags are
:mod:`cecai_converter.option_flags`. What a container receives is the resolved :class:`Request` as JSON
(:func:`Request.to_json`), instead of a rebuilt command line.

Precedence, lowest first: default < YAML < environment < CLI. :func:`resolve` records where each value came from
(``Request.sources``), and the pipeline writes both into every manifest under ``request``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import environment
from .errors import ConfigError, ConverterError, UsageError
from .names import show
from .option_table import (
    BY_NAME,
    OPTIONS,
    SOURCES,
    Command,
    Source,
    file_of,
    from_json_value,
    from_text,
    from_yaml,
    to_json_value,
)
from .request_options import Options
from .texts import TEXT_VARIABLES, check_text_file
from .untrusted_json import load_bounded_file, loads_bounded

__all__ = [
    "REQUEST_ENV",
    "Request",
    "check_texts",
    "load_request",
    "resolve",
]

#: The variable a container reads its request from (``run --request env:CECAI_REQUEST``).
REQUEST_ENV: Final = environment.REQUEST
# A request is a few hundred bytes; a megabyte leaves room for long paths and thresholds, not for an attack.
_MAX_REQUEST_BYTES: Final = 1024 * 1024
_REQUEST_HINT: Final = "give a request as `Request.to_json` writes it (the docker backend hands one to each container)"


# -- the request -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """The resolved options of one conversion and where each came from.

    Attributes:
        values: option name → value (paths absolute, ``imatrix`` a path or ``"auto"``, unset ones None).
        sources: option name → ``default`` | ``yaml`` | ``env`` | ``cli``.
    """

    values: Mapping[str, Any]
    sources: Mapping[str, Source] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def record(self) -> dict[str, Any]:
        """The manifest's ``request``: ``{"values": {...}, "sources": {...}}``, JSON-ready."""
        return {
            "values": {name: to_json_value(self.values[name]) for name in BY_NAME},
            "sources": {name: self.sources.get(name, "default") for name in BY_NAME},
        }

    def to_json(self) -> str:
        """The request as one JSON document (what a container receives)."""
        return json.dumps(self.record(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "the request") -> Request:
        """Read :meth:`to_json`'s output back.

        Raises:
            UsageError: not JSON, not a request, or an option the table does not know.
        """

        return cls.from_data(loads_bounded(text, what=where, max_bytes=_MAX_REQUEST_BYTES, hint=_REQUEST_HINT), where)

    @classmethod
    def from_data(cls, data: object, where: str = "the request") -> Request:
        """A request from :meth:`to_json`'s output, parsed (by the bounded reader); every value checked.

        Raises:
            UsageError: not a request, or an option the table does not know.
        """
        try:
            values, sources = data["values"], data["sources"]  # type: ignore[index]
            unknown = sorted(str(name) for name in (set(values) | set(sources)) - set(BY_NAME))
            if unknown:
                # each name shown bounded (the file may hold a megabyte of one), at most ten of them
                names = ", ".join(n if n.isidentifier() and len(n) <= 40 else show(n) for n in unknown[:10])
                more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
                raise UsageError(
                    f"{where}: unknown options {names}{more}",
                    hint="the request was written by another version of cecai-converter: use the same version "
                    "outside and inside the container",
                )
            bad = sorted(n for n, s in sources.items() if s not in SOURCES)
            if bad:
                raise UsageError(f"{where}: unknown sources for {', '.join(bad)}")
            missing = sorted(set(BY_NAME) - set(values))
            if missing:
                raise UsageError(
                    f"{where}: no value for {', '.join(missing)}",
                    hint="a request carries every option, resolved: write it with the same version of "
                    "cecai-converter that reads it",
                )
            return cls(
                values={s.name: from_json_value(s, values[s.name], where) for s in OPTIONS},
                sources={s.name: sources.get(s.name, "default") for s in OPTIONS},
            )
        except ConverterError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{where} is not a cecai-converter request ({type(exc).__name__}: {exc})") from None

    def replace(self, **values: Any) -> Request:
        """The same request with some values changed (sources kept): the docker backend's container paths."""
        return Request({**self.values, **values}, self.sources)

    def group_key(self) -> str:
        """What pairs must agree on to share one conversion: every value except the per-target ones."""
        shared = {n: to_json_value(v) for n, v in self.values.items() if not BY_NAME[n].per_target}
        return json.dumps(shared, sort_keys=True)

    def to_options(self, n_gpu_layers: int = 0) -> Options:
        """The :class:`~cecai_converter.request_options.Options` the pipeline reads for this request."""
        imatrix = self.values["imatrix"]
        return Options(
            force=bool(self.values["force"]),
            keep_base=bool(self.values["keep_base"]),
            threads=self.values["threads"],
            allow_pickle=bool(self.values["allow_pickle"]),
            imatrix=None if imatrix == "auto" else imatrix,
            compute_imatrix=imatrix == "auto",
            calibration_text=self.values["calibration_text"],
            fidelity=bool(self.values["fidelity"]),
            fidelity_on=str(self.values.get("fidelity_on") or "builder"),
            eval_text=self.values["eval_text"],
            fidelity_target=float(self.values.get("fidelity_target") or 0.1),
            fidelity_tokens=str(self.values.get("fidelity_tokens") or "auto"),
            thresholds=self.values["thresholds"] or {},
            n_gpu_layers=n_gpu_layers,
            reference=bool(self.values["reference"]),
            tensor_types=tuple(self.values.get("tensor_types") or ()),
            text_only=bool(self.values.get("text_only")),
            source_check=bool(self.values.get("source_check", True)),
            trust_remote_code=bool(self.values.get("trust_remote_code")),
        )


def resolve(
    cli: Mapping[str, Any] | argparse.Namespace,
    yaml_mapping: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    command: Command = "run",
    config_dir: Path | None = None,
    yaml_where: str | Mapping[str, str] = "the configuration",
    cwd: Path | None = None,
) -> Request:
    """Resolve every option: default < YAML < environment < CLI, recording each value's source.

    Args:
        cli: parsed arguments (an argparse namespace or a mapping); None (or absent) means "not given".
        yaml_mapping: the merged ``converter_args*.yaml`` keys (other keys are ignored here; config.py checks them).
        environ: the environment; an empty variable counts as unset (an action input left empty).
        command: ``run`` or ``convert`` (some defaults differ).
        config_dir: ``configurations/``; YAML paths are relative to it.
        yaml_where: how messages name the YAML: its file, or per key the file that set it.
        cwd: the folder CLI and variable paths are relative to; default the current one.

    Raises:
        UsageError: a variable holds a malformed value (the message names it).
        ConfigError: a YAML key holds a malformed value (the message names the file and key).
    """
    given = vars(cli) if isinstance(cli, argparse.Namespace) else dict(cli)
    base = cwd or Path.cwd()
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for spec in OPTIONS:
        source: Source = "default"
        value = spec.default_for(command)
        if spec.yaml_key is not None and yaml_mapping.get(spec.yaml_key) is not None:
            where = f"{file_of(yaml_where, spec.yaml_key)}: {spec.yaml_key}"
            value, source = from_yaml(spec, yaml_mapping[spec.yaml_key], where, config_dir), "yaml"
        text = environ.get(spec.env, "")
        if text.strip():
            value, source = from_text(spec, text, spec.env, base), "env"
        flag = given.get(spec.name)
        if flag is not None:
            if isinstance(flag, str | Path) and spec.kind in ("path", "imatrix"):
                flag = from_text(spec, str(flag), spec.flag, base)
            if spec.kind == "tensor_types":  # the repeated flag's entries, each checked by the parser
                flag = tuple(rule for entry in flag for rule in entry or ()) or None
            value, source = flag, "cli"
        values[spec.name], sources[spec.name] = value, source
    return Request(values, sources)


def check_texts(request: Request, yaml_where: str | Mapping[str, str] = "the configuration") -> None:
    """EVAL_TEXT / CALIBRATION_TEXT checked with the configuration, before any work (texts.py), not when fidelity or
    the imatrix reads them after the conversion; each refusal names where the text was given.

    Raises:
        UsageError: a flag or variable names no usable text; ConfigError: a YAML key does (both exit 2).
    """

    for name, min_tokens in TEXT_VARIABLES.items():
        path, source, spec = request.values.get(name), request.sources.get(name), BY_NAME[name]
        if not isinstance(path, Path):
            continue
        error: type[UsageError] = ConfigError if source == "yaml" else UsageError
        if source == "yaml":
            where = f"{file_of(yaml_where, str(spec.yaml_key))}: {spec.yaml_key}"
        else:
            where = spec.env if source == "env" else spec.flag
        check_text_file(path, where, min_tokens=min_tokens, error=error)


def load_request(source: str) -> Request:
    """The request a container was given: ``env:NAME`` (a variable) or a JSON file.

    Raises:
        UsageError: the variable is unset, the file unreadable, or the text no request.
    """
    if source.startswith("env:"):
        name = source.removeprefix("env:")
        text = os.environ.get(name)
        if not text:
            raise UsageError(f"--request {source}: the variable {name} is not set")
        return Request.from_json(text, f"--request {source}")

    where = f"--request {source}"
    data = load_bounded_file(Path(source), what=where, max_bytes=_MAX_REQUEST_BYTES, hint=_REQUEST_HINT)
    return Request.from_data(data, where)
