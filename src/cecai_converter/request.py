"""One typed request: every conversion option in one table, resolved once, recorded in the manifest.

Each :class:`OptionSpec` of :data:`OPTIONS` names an option's flag, its key in ``converter_args*.yaml``, its
environment variable (``CECAI_<NAME>``), its default, its parser and its help. Everything else derives from the
table: the ``run``/``convert``/``demo`` flags (:func:`add_arguments`), the optional configuration keys
(:data:`YAML_KEYS`, read by :mod:`cecai_converter.config`), the composite actions' inputs (each passes its input
as the option's variable; ``tests/test_request.py`` keeps action.yml in step) and what a container receives (the
resolved :class:`Request` as JSON, :func:`Request.to_json`, instead of a rebuilt command line).

Precedence, lowest first: default < YAML < environment < CLI. :func:`resolve` records where each value came from
(``Request.sources``), and the pipeline writes both into every manifest under ``request``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Final, Literal

from .errors import ConfigError, ConverterError, UsageError
from .names import show

if TYPE_CHECKING:
    from .pairs import PairInfo
    from .pipeline import Options

__all__ = [
    "DOC_BEGIN",
    "DOC_END",
    "ENV_PREFIX",
    "FIDELITY_ON",
    "OPTIONS",
    "REQUEST_ENV",
    "SOURCES",
    "YAML_KEYS",
    "OptionSpec",
    "Request",
    "Source",
    "add_arguments",
    "check_texts",
    "check_yaml",
    "gpu_layers",
    "load_request",
    "markdown_table",
    "resolve",
    "spec_of",
    "without_host_paths",
]

Source = Literal["default", "yaml", "env", "cli"]
#: The sources of a value, lowest precedence first.
SOURCES: Final[tuple[Source, ...]] = ("default", "yaml", "env", "cli")
#: Every option's variable is this prefix and its name in capitals (``CECAI_KEEP_BASE``).
ENV_PREFIX: Final = "CECAI_"
#: The variable a container reads its request from (``run --request env:CECAI_REQUEST``).
REQUEST_ENV: Final = "CECAI_REQUEST"
#: What each value kind parses from text (a flag, a variable) and from YAML.
Kind = Literal[
    "switch", "bool", "int", "threads", "gpu_layers", "path", "imatrix", "thresholds",
    "tensor_types", "fidelity_on", "fidelity_target", "fidelity_tokens",
]  # fmt: skip
#: Where fidelity is measured (FIDELITY_ON): on the builder, or by the release flow's check jobs (check.py).
FIDELITY_ON: Final = ("builder", "check")
Command = Literal["run", "convert"]

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class OptionSpec:
    """One conversion option: where it can be set, how it is parsed, and what it is for.

    Attributes:
        name: the field name (``keep_base``); the argparse ``dest`` and the key in the request's JSON.
        flag: the CLI flag (``--keep-base``); a ``bool`` kind also gets ``--no-…``.
        yaml_key: the key in ``converter_args*.yaml``, or None for an option that is no setting of a model
            (``--force`` is a one-off).
        kind: how the value is parsed (see :func:`_from_text` and :func:`_from_yaml`).
        default: the value when nothing sets it, or a function of the command (``convert`` writes reference.json by
            default, ``run`` does not).
        help: one line for ``--help``, the configuration hint and the action input's description.
        affects_output: whether the value changes the bytes or the set of files published (what a reproduction
            must repeat); the others change how the work runs or what is measured.
        to_container: whether the docker backend sends the value into the container (all do today: the container
            converts with the caller's request).
        per_target: the value may differ between pairs sharing one conversion (each pair's runtime applies it).
    """

    name: str
    flag: str
    yaml_key: str | None
    kind: Kind
    default: object
    help: str
    affects_output: bool = False
    to_container: bool = True
    per_target: bool = False
    metavar: str | None = None
    #: other spellings of the flag (``--tensor-type``, llama-quantize's own)
    aliases: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        """The environment variable: ``CECAI_`` and the name in capitals."""
        return ENV_PREFIX + self.name.upper()

    @property
    def action_env(self) -> str:
        """The variable the composite actions pass the input in (``INPUT_KEEP_BASE``); the adapter copies a
        non-empty one to :attr:`env`, so an input left empty leaves a caller's own ``CECAI_<NAME>`` in force."""
        return "INPUT_" + self.name.upper()

    @property
    def action_input(self) -> str:
        """The composite actions' input: the flag without its dashes (``keep-base``)."""
        return self.flag.removeprefix("--")

    def default_for(self, command: Command) -> Any:
        """The default of this option for ``command``."""
        return self.default(command) if callable(self.default) else self.default

    def names(self) -> str:
        """How a user can set it, for messages: ``--keep-base, KEEP_BASE or CECAI_KEEP_BASE``."""
        where = [self.flag] + ([self.yaml_key] if self.yaml_key else []) + [self.env]
        return ", ".join(where[:-1]) + " or " + where[-1]


#: The conversion options. Adding one here gives it a flag, a YAML key, a variable, an action input, a place in
#: the container's request and in the manifest; the pipeline's :class:`~cecai_converter.pipeline.Options` reads it.
OPTIONS: Final[tuple[OptionSpec, ...]] = (
    OptionSpec("force", "--force", None, "switch", False, "redo the work even when the outputs are current"),
    OptionSpec(
        "keep_base", "--keep-base", "KEEP_BASE", "switch", False, "also publish the unquantized base GGUF",
        affects_output=True,
    ),
    OptionSpec(
        "threads", "--threads", "THREADS", "threads", None,
        "threads for quantization and verification, 1 to 512 (default: all cores)", metavar="N",
    ),
    OptionSpec(
        "allow_pickle", "--allow-pickle", "ALLOW_PICKLE", "switch", False,
        "accept pickle .bin weights (unpickling runs code from the file: only for models you trust)",
    ),
    OptionSpec(
        "imatrix", "--imatrix", "IMATRIX", "imatrix", None,
        "importance matrix for quantization (needed by IQ* types): a file (in YAML relative to configurations/), "
        "or `auto` to compute one with llama-imatrix on the calibration text",
        affects_output=True, metavar="FILE|auto",
    ),
    OptionSpec(
        "calibration_text", "--calibration-text", "CALIBRATION_TEXT", "path", None,
        "text to compute the importance matrix from (in YAML relative to configurations/; default: shipped text)",
        affects_output=True, metavar="FILE",
    ),
    OptionSpec(
        "fidelity", "--fidelity", "FIDELITY", "bool", True,
        "measure KL-divergence and perplexity of every file against the base (default: on)",
    ),
    OptionSpec(
        "fidelity_on", "--fidelity-on", "FIDELITY_ON", "fidelity_on", "builder",
        "where fidelity is measured: `builder` (this run), or `check` (the release flow's check jobs measure it on "
        "their runtime, a GPU's in a fraction of the time; the outputs folder then carries the base GGUF for them, "
        "and publish refuses a release whose checks did not measure it)",
        metavar="builder|check",
    ),
    OptionSpec(
        "eval_text", "--eval-text", "EVAL_TEXT", "path", None,
        "the text fidelity is measured on (in YAML relative to configurations/; default: shipped text)",
        metavar="FILE",
    ),
    OptionSpec(
        "fidelity_target", "--fidelity-target", "FIDELITY_TARGET", "fidelity_target", 0.1,
        "the error bar fidelity stops at: the KL-divergence mean's standard error as a fraction of the mean "
        "(±0.0005 nats is always enough), with ±2 points on top-1; 0.01 to 1 (see docs/fidelity.md)",
        metavar="FRACTION",
    ),
    OptionSpec(
        "fidelity_tokens", "--fidelity-tokens", "FIDELITY_TOKENS", "fidelity_tokens", "auto",
        "how much of the evaluation text fidelity reads: `auto` (until the target error bar, at least 500 "
        "positions) or `all` (the whole text, as llama-perplexity does)",
        metavar="auto|all",
    ),
    OptionSpec(
        "thresholds", "--thresholds", "THRESHOLDS", "thresholds", None,
        "fidelity limits PRECISION -> {max_kld, max_ppl_delta_pct}; exceeding one fails the run (flag and "
        "variable: the mapping as JSON)",
        metavar="JSON",
    ),
    OptionSpec(
        "reference", "--reference", "REFERENCE", "bool", lambda command: command == "convert",
        "write reference.json: this runtime's predictions for each file, which `cecai-convert check` compares "
        "other runtimes against (default: on for convert, off for run)",
    ),
    OptionSpec(
        "n_gpu_layers", "--n-gpu-layers", "N_GPU_LAYERS", "gpu_layers", None,
        "layers to offload when verifying/measuring, -1 for all (default: all on GPU pairs when the runtime has a "
        "GPU, else 0)",
        per_target=True, metavar="N",
    ),
    OptionSpec(
        "tensor_types", "--tensor-types", "TENSOR_TYPES", "tensor_types", None,
        "per-tensor quantization types, llama-quantize's --tensor-type PATTERN=TYPE (regex searched in tensor "
        "names, ggml type): the flag repeated, a YAML list, or entries separated by spaces",
        affects_output=True, metavar="PATTERN=TYPE", aliases=("--tensor-type",),
    ),
    OptionSpec(
        "text_only", "--text-only", "TEXT_ONLY", "bool", False,
        "publish the text model alone when the model has towers this conversion cannot export (vision without "
        "projector support, audio, multi-token prediction); recorded in the manifest and the card (default: refuse)",
        affects_output=True,
    ),
    OptionSpec(
        "source_check", "--source-check", "SOURCE_CHECK", "bool", True,
        "compare the base GGUF with the source model (tokenizer, chat template, hyperparameters, logits through "
        "transformers); a difference fails the run (default: on)",
    ),
    OptionSpec(
        "trust_remote_code", "--trust-remote-code", "TRUST_REMOTE_CODE", "switch", False,
        "let the source check run a model's own Python code from its repository (auto_map) where transformers "
        "needs it (only for models you trust)",
    ),
)  # fmt: skip

_BY_NAME: Final[Mapping[str, OptionSpec]] = {spec.name: spec for spec in OPTIONS}
# A request is a few hundred bytes; a megabyte leaves room for long paths and thresholds, not for an attack.
_MAX_REQUEST_BYTES: Final = 1024 * 1024
_REQUEST_HINT: Final = "give a request as `Request.to_json` writes it (the docker backend hands one to each container)"


def without_host_paths(record: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's ``request`` record as published: each file option reduced to its file name.

    Where a text or imatrix lay on the builder's machine means nothing to a downloader and would leak its folder
    layout; the name (with the sha256 the manifest records elsewhere) is what identifies the input.
    """
    values = dict(record.get("values") or {})
    for name, value in values.items():
        spec = _BY_NAME.get(name)
        if spec is not None and spec.kind in ("path", "imatrix") and isinstance(value, str) and value != "auto":
            values[name] = PurePath(value).name
    return {**record, "values": values}


#: The optional configuration keys the table defines, with their help (config.py merges them into its schema).
YAML_KEYS: Final[Mapping[str, OptionSpec]] = {spec.yaml_key: spec for spec in OPTIONS if spec.yaml_key}


def spec_of(name: str) -> OptionSpec:
    """The table's entry for ``name``.

    Raises:
        KeyError: no such option.
    """
    return _BY_NAME[name]


# -- parsing ---------------------------------------------------------------------------------------------------------
def _from_text(spec: OptionSpec, text: str, where: str, base: Path) -> Any:
    """The value of ``spec`` written as text (a flag's argument, a variable); relative paths against ``base``.

    Raises:
        UsageError: naming ``where`` (the flag or the variable).
    """
    if spec.kind in ("switch", "bool"):
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise UsageError(f"{where}={show(text)} is not a yes/no value", hint="use 1/0, true/false, yes/no or on/off")
    if spec.kind == "threads":
        from .tools import thread_count

        try:
            return thread_count(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{where}: {exc}") from None
    if spec.kind == "gpu_layers":
        from .tools import gpu_layer_count

        try:
            return gpu_layer_count(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{where}: {exc}") from None
    if spec.kind == "fidelity_on":
        word = text.strip().lower()
        if word in FIDELITY_ON:
            return word
        raise UsageError(
            f"{where}={show(text)} is not a place to measure fidelity",
            hint="give builder (this run measures it) or check (the release flow's check jobs do)",
        )
    if spec.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{where}: {show(text)} is not a whole number") from None
    if spec.kind == "fidelity_target":
        from .fidelity import check_target

        try:
            number: object = float(text)
        except ValueError:
            number = text
        return check_target(number, where, error=UsageError)
    if spec.kind == "fidelity_tokens":
        return _token_mode(text, where, UsageError)
    if spec.kind == "thresholds":
        from .untrusted_json import loads_bounded

        data = loads_bounded(text, what=where, max_bytes=64 * 1024, hint='e.g. {"Q4_K_M": {"max_kld": 0.1}}')
        return _thresholds(data, where)
    if spec.kind == "tensor_types":
        from .quant_types import parse_rules_text

        return parse_rules_text(text, where) or None
    if spec.kind == "imatrix" and text.strip().lower() == "auto":
        return "auto"
    if not text.strip():
        raise UsageError(f"{where}: empty file name")
    return (base / text).resolve()


def _from_yaml(spec: OptionSpec, value: object, where: str, config_dir: Path | None) -> Any:
    """The value of ``spec`` as read from YAML (typed); relative paths against ``config_dir``.

    Raises:
        ConfigError: naming ``where`` (the file and the key).
    """
    if spec.kind in ("switch", "bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be a bool (true/false), got {show(value)}")
        return value
    if spec.kind in ("int", "threads", "gpu_layers"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an int, got {show(value)}")
        if spec.kind in ("threads", "gpu_layers"):
            try:
                return _from_text(spec, str(value), where, Path.cwd())
            except UsageError as exc:
                raise ConfigError(exc.message) from None
        return value
    if spec.kind == "thresholds":
        return _thresholds(value, where)
    if spec.kind == "tensor_types":
        return _tensor_types(value, where, ConfigError)
    if spec.kind == "fidelity_target":
        from .fidelity import check_target

        return check_target(value, where)
    if spec.kind == "fidelity_tokens":
        return _token_mode(value, where, ConfigError)
    if spec.kind == "fidelity_on":
        try:
            return _from_text(spec, value if isinstance(value, str) else repr(value), where, Path.cwd())
        except UsageError as exc:
            raise ConfigError(exc.message, hint=exc.hint) from None
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a file name (a string), got {show(value)}")
    if not value.strip():
        what = "a file name or `auto`" if spec.kind == "imatrix" else "a file name"
        raise ConfigError(f"{where} is empty", hint=f"give {what}, or remove the key")
    if spec.kind == "imatrix" and value.strip().lower() == "auto":
        return "auto"
    if config_dir is None:
        raise ConfigError(f"{where}: a relative file name needs a configurations/ folder")
    _check_file_name(value, where, ConfigError)
    path = (config_dir / value).resolve()
    # A Converter folder is data from whoever made it: its files stay inside it (symbolic links followed), so a
    # shipped YAML cannot make the converter read, or a container mount, /proc/self/environ or a home folder.
    converter = config_dir.resolve().parent
    if not path.is_relative_to(converter):
        raise ConfigError(
            f"{where}: {show(value)} points outside the Converter folder ({path})",
            hint=f"put the file inside {converter}, or give it on the command line ({spec.flag}) or as {spec.env}",
        )
    return path


def _token_mode(value: object, where: str, error: type[UsageError]) -> str:
    """FIDELITY_TOKENS: ``auto`` or ``all`` (any case), else ``error`` naming ``where``."""
    from .fidelity import TOKEN_MODES

    word = value.strip().lower() if isinstance(value, str) else None
    if word is None or word not in TOKEN_MODES:
        raise error(
            f"{where} must be one of {', '.join(TOKEN_MODES)}, got {show(value)}",
            hint="auto stops at the target error bar (FIDELITY_TARGET); all reads the whole evaluation text",
        )
    return word


def _thresholds(value: object, where: str) -> dict[str, dict[str, float]]:
    from .fidelity import validate_thresholds

    return validate_thresholds(value, where=where)


def _tensor_types(value: object, where: str, error: type[UsageError] | type[ConfigError]) -> tuple[str, ...] | None:
    from .quant_types import parse_rules

    try:
        return parse_rules(value, where) or None
    except UsageError as exc:
        raise error(exc.message, hint=exc.hint) from None


def _to_json_value(value: Any) -> Any:
    if isinstance(value, tuple):  # TENSOR_TYPES: a list in JSON
        return list(value)
    return str(value) if isinstance(value, Path) else value


def _from_json_value(spec: OptionSpec, value: object, where: str) -> Any:
    """A value of a JSON request, checked as strictly as a flag: the file may come from anywhere.

    Raises:
        UsageError: naming ``where`` and the option.
    """
    here = f"{where}: {spec.name}"
    if value is None:
        if spec.kind in ("switch", "bool"):
            raise UsageError(f"{here} must be true or false, got null")
        return None
    if spec.kind in ("switch", "bool"):
        if not isinstance(value, bool):
            raise UsageError(f"{here} must be true or false, got {show(value)}")
        return value
    if spec.kind in ("int", "threads", "gpu_layers"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{here} must be a whole number, got {show(value)}")
        return _from_text(spec, str(value), here, Path.cwd()) if spec.kind != "int" else value
    if spec.kind == "thresholds":
        return _thresholds(value, here)
    if spec.kind == "fidelity_target":
        from .fidelity import check_target

        return check_target(value, here, error=UsageError)
    if spec.kind == "fidelity_tokens":
        return _token_mode(value, here, UsageError)
    if spec.kind == "fidelity_on":
        return _from_text(spec, value if isinstance(value, str) else repr(value), here, Path.cwd())
    if spec.kind == "tensor_types":
        if not isinstance(value, list):
            raise UsageError(f"{here} must be a list of PATTERN=TYPE strings, got {show(value)}")
        return _tensor_types(value, here, UsageError)
    if spec.kind == "imatrix" and value == "auto":
        return "auto"
    if not isinstance(value, str) or not value or not PurePath(value).is_absolute():
        raise UsageError(f"{here} must be an absolute file name, got {show(value)}")
    _check_file_name(value, here, UsageError)
    return Path(value)


def _check_file_name(value: str, where: str, error: type[UsageError]) -> None:
    """Refuse a control character in a file name from a file: a NUL is a ValueError (a traceback) in every path
    call, a line break would forge a log line."""
    from .names import control_character

    bad = control_character(value)
    if bad is not None:
        raise error(f"{where}: {show(value)} holds the control character {bad}: not a file name")


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
            "values": {name: _to_json_value(self.values[name]) for name in _BY_NAME},
            "sources": {name: self.sources.get(name, "default") for name in _BY_NAME},
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
        from .untrusted_json import loads_bounded

        return cls.from_data(loads_bounded(text, what=where, max_bytes=_MAX_REQUEST_BYTES, hint=_REQUEST_HINT), where)

    @classmethod
    def from_data(cls, data: object, where: str = "the request") -> Request:
        """A request from :meth:`to_json`'s output, parsed (by the bounded reader); every value checked.

        Raises:
            UsageError: not a request, or an option the table does not know.
        """
        try:
            values, sources = data["values"], data["sources"]  # type: ignore[index]
            unknown = sorted(str(name) for name in (set(values) | set(sources)) - set(_BY_NAME))
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
            missing = sorted(set(_BY_NAME) - set(values))
            if missing:
                raise UsageError(
                    f"{where}: no value for {', '.join(missing)}",
                    hint="a request carries every option, resolved: write it with the same version of "
                    "cecai-converter that reads it",
                )
            return cls(
                values={s.name: _from_json_value(s, values[s.name], where) for s in OPTIONS},
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
        shared = {n: _to_json_value(v) for n, v in self.values.items() if not _BY_NAME[n].per_target}
        return json.dumps(shared, sort_keys=True)

    def to_options(self, n_gpu_layers: int = 0) -> Options:
        """The pipeline's :class:`~cecai_converter.pipeline.Options` for this request."""
        from .pipeline import Options

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
            where = f"{_file_of(yaml_where, spec.yaml_key)}: {spec.yaml_key}"
            value, source = _from_yaml(spec, yaml_mapping[spec.yaml_key], where, config_dir), "yaml"
        text = environ.get(spec.env, "")
        if text.strip():
            value, source = _from_text(spec, text, spec.env, base), "env"
        flag = given.get(spec.name)
        if flag is not None:
            if isinstance(flag, str | Path) and spec.kind in ("path", "imatrix"):
                flag = _from_text(spec, str(flag), spec.flag, base)
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
    from .texts import TEXT_VARIABLES, check_text_file

    for name, min_tokens in TEXT_VARIABLES.items():
        path, source, spec = request.values.get(name), request.sources.get(name), _BY_NAME[name]
        if not isinstance(path, Path):
            continue
        error: type[UsageError] = ConfigError if source == "yaml" else UsageError
        if source == "yaml":
            where = f"{_file_of(yaml_where, str(spec.yaml_key))}: {spec.yaml_key}"
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
    from .untrusted_json import load_bounded_file

    where = f"--request {source}"
    data = load_bounded_file(Path(source), what=where, max_bytes=_MAX_REQUEST_BYTES, hint=_REQUEST_HINT)
    return Request.from_data(data, where)


# -- the parser ------------------------------------------------------------------------------------------------------
def _arg_type(spec: OptionSpec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if spec.kind in ("path", "imatrix"):
            return text  # resolved by resolve(), against the working directory
        try:
            return _from_text(spec, text, spec.flag, Path.cwd())
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


# -- policies --------------------------------------------------------------------------------------------------------
def gpu_layers(request: Request, pair: PairInfo | None, warn: Callable[[str], None]) -> int:
    """The layers ``pair``'s runtime offloads: the request's ``n_gpu_layers``, else the pair's policy.

    A GPU pair offloads everything when this llama-cpp-python has GPU support; without it, it verifies on the CPU
    and ``warn`` says so.
    """
    if request["n_gpu_layers"] is not None:
        return int(request["n_gpu_layers"])
    from .check import default_gpu_layers
    from .toolchain import installed_runtime_version

    layers = default_gpu_layers(pair)
    if layers != 0 or pair is None or not pair.gpu or installed_runtime_version() is None:
        return layers
    warn(
        f"{pair.name} is a GPU pair but this llama-cpp-python has no GPU support: verifying on the CPU "
        "(use the pair's image, --backend docker, to verify on its runtime)"
    )
    return 0


def _file_of(where: str | Mapping[str, str], key: str) -> str:
    return where if isinstance(where, str) else where.get(key, "the configuration")


def check_yaml(mapping: Mapping[str, Any], where: str | Mapping[str, str], config_dir: Path | None) -> dict[str, Any]:
    """The option keys set in ``mapping``, parsed (what config.py checks when it reads a Converter folder).

    Raises:
        ConfigError: naming the file (``where``, or ``where[key]``: the file that set the key) and the key.
    """
    return {
        spec.name: _from_yaml(spec, mapping[key], f"{_file_of(where, key)}: {key}", config_dir)
        for key, spec in YAML_KEYS.items()
        if mapping.get(key) is not None
    }


# -- the user documentation ------------------------------------------------------------------------------------------
#: docs/options.md holds :func:`markdown_table` between these markers (tests/test_request.py keeps it current).
DOC_BEGIN: Final = "<!-- options table: generated from cecai_converter.request.OPTIONS -->"
DOC_END: Final = "<!-- end of options table -->"


def markdown_table() -> str:
    """The options as a Markdown table: flag, YAML key, variable, action input, default, what it does."""

    def default_text(spec: OptionSpec) -> str:
        run, convert = spec.default_for("run"), spec.default_for("convert")
        if run != convert:
            return f"run: {json.dumps(run)}, convert: {json.dumps(convert)}"
        return "—" if run is None else json.dumps(run)

    rows = [
        "| Flag | YAML key | Variable | Action input | Default | Changes the files | What it does |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in OPTIONS:
        flag = f"`{spec.flag}`" + (f" / `--no-{spec.flag[2:]}`" if spec.kind == "bool" else "")
        yaml_key = f"`{spec.yaml_key}`" if spec.yaml_key else "—"
        what = spec.help.replace("|", "\\|")
        rows.append(
            f"| {flag} | {yaml_key} | `{spec.env}` | `{spec.action_input}` | {default_text(spec)} | "
            f"{'yes' if spec.affects_output else 'no'} | {what} |"
        )
    return "\n".join(rows)
