"""The conversion options, one table: every option's flag, YAML key, variable, default, parser and help.

Each :class:`OptionSpec` of :data:`OPTIONS` names an option's flag, its key in ``converter_args*.yaml``, its
environment variable (``CECAI_<NAME>``), its default, its parser and its help. Everything else derives from the
table: the ``run``/``convert``/``demo`` flags (:func:`cecai_converter.option_flags.add_arguments`), the optional
configuration keys (:data:`YAML_KEYS`, read by :mod:`cecai_converter.config`), the composite actions' inputs (each
passes its input as the option's variable; :mod:`cecai_converter.generate` writes them into action.yml), docs/options.md
(:func:`markdown_table`) and the values of a :class:`cecai_converter.request.Request` (parsed here from text, YAML and
JSON).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Final, Literal

from .errors import ConfigError, UsageError
from .fidelity import TOKEN_MODES, check_target, validate_thresholds
from .names import control_character, show
from .processes import thread_count
from .quant_types import parse_rules, parse_rules_text
from .runtime import gpu_layer_count
from .untrusted_json import loads_bounded

__all__ = [
    "BY_NAME",
    "DOC_BEGIN",
    "DOC_END",
    "ENV_PREFIX",
    "FIDELITY_ON",
    "OPTIONS",
    "SOURCES",
    "YAML_KEYS",
    "Command",
    "Kind",
    "OptionSpec",
    "Source",
    "check_yaml",
    "file_of",
    "from_json_value",
    "from_text",
    "from_yaml",
    "markdown_table",
    "spec_of",
    "to_json_value",
    "without_host_paths",
]

Source = Literal["default", "yaml", "env", "cli"]
#: The sources of a value, lowest precedence first.
SOURCES: Final[tuple[Source, ...]] = ("default", "yaml", "env", "cli")
#: Every option's variable is this prefix and its name in capitals (``CECAI_KEEP_BASE``).
ENV_PREFIX: Final = "CECAI_"
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
        kind: how the value is parsed (see :func:`from_text` and :func:`from_yaml`).
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
#: the container's request and in the manifest; the pipeline reads it from
#: :class:`~cecai_converter.request_options.Options`.
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

#: Each option's entry by its name, in the table's order.
BY_NAME: Final[Mapping[str, OptionSpec]] = {spec.name: spec for spec in OPTIONS}


def without_host_paths(record: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's ``request`` record as published: each file option reduced to its file name.

    Where a text or imatrix lay on the builder's machine means nothing to a downloader and would leak its folder
    layout; the name (with the sha256 the manifest records elsewhere) is what identifies the input.
    """
    values = dict(record.get("values") or {})
    for name, value in values.items():
        spec = BY_NAME.get(name)
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
    return BY_NAME[name]


# -- parsing ---------------------------------------------------------------------------------------------------------
def from_text(spec: OptionSpec, text: str, where: str, base: Path) -> Any:
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
        try:
            return thread_count(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{where}: {exc}") from None
    if spec.kind == "gpu_layers":
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
        try:
            number: object = float(text)
        except ValueError:
            number = text
        return check_target(number, where, error=UsageError)
    if spec.kind == "fidelity_tokens":
        return _token_mode(text, where, UsageError)
    if spec.kind == "thresholds":
        data = loads_bounded(text, what=where, max_bytes=64 * 1024, hint='e.g. {"Q4_K_M": {"max_kld": 0.1}}')
        return _thresholds(data, where)
    if spec.kind == "tensor_types":
        return parse_rules_text(text, where) or None
    if spec.kind == "imatrix" and text.strip().lower() == "auto":
        return "auto"
    if not text.strip():
        raise UsageError(f"{where}: empty file name")
    return (base / text).resolve()


def from_yaml(spec: OptionSpec, value: object, where: str, config_dir: Path | None) -> Any:
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
                return from_text(spec, str(value), where, Path.cwd())
            except UsageError as exc:
                raise ConfigError(exc.message) from None
        return value
    if spec.kind == "thresholds":
        return _thresholds(value, where)
    if spec.kind == "tensor_types":
        return _tensor_types(value, where, ConfigError)
    if spec.kind == "fidelity_target":
        return check_target(value, where)
    if spec.kind == "fidelity_tokens":
        return _token_mode(value, where, ConfigError)
    if spec.kind == "fidelity_on":
        try:
            return from_text(spec, value if isinstance(value, str) else repr(value), where, Path.cwd())
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

    word = value.strip().lower() if isinstance(value, str) else None
    if word is None or word not in TOKEN_MODES:
        raise error(
            f"{where} must be one of {', '.join(TOKEN_MODES)}, got {show(value)}",
            hint="auto stops at the target error bar (FIDELITY_TARGET); all reads the whole evaluation text",
        )
    return word


def _thresholds(value: object, where: str) -> dict[str, dict[str, float]]:

    return validate_thresholds(value, where=where)


def _tensor_types(value: object, where: str, error: type[UsageError] | type[ConfigError]) -> tuple[str, ...] | None:

    try:
        return parse_rules(value, where) or None
    except UsageError as exc:
        raise error(exc.message, hint=exc.hint) from None


def to_json_value(value: Any) -> Any:
    if isinstance(value, tuple):  # TENSOR_TYPES: a list in JSON
        return list(value)
    return str(value) if isinstance(value, Path) else value


def from_json_value(spec: OptionSpec, value: object, where: str) -> Any:
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
        return from_text(spec, str(value), here, Path.cwd()) if spec.kind != "int" else value
    if spec.kind == "thresholds":
        return _thresholds(value, here)
    if spec.kind == "fidelity_target":
        return check_target(value, here, error=UsageError)
    if spec.kind == "fidelity_tokens":
        return _token_mode(value, here, UsageError)
    if spec.kind == "fidelity_on":
        return from_text(spec, value if isinstance(value, str) else repr(value), here, Path.cwd())
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

    bad = control_character(value)
    if bad is not None:
        raise error(f"{where}: {show(value)} holds the control character {bad}: not a file name")


def file_of(where: str | Mapping[str, str], key: str) -> str:
    return where if isinstance(where, str) else where.get(key, "the configuration")


def check_yaml(mapping: Mapping[str, Any], where: str | Mapping[str, str], config_dir: Path | None) -> dict[str, Any]:
    """The option keys set in ``mapping``, parsed (what config.py checks when it reads a Converter folder).

    Raises:
        ConfigError: naming the file (``where``, or ``where[key]``: the file that set the key) and the key.
    """
    return {
        spec.name: from_yaml(spec, mapping[key], f"{file_of(where, key)}: {key}", config_dir)
        for key, spec in YAML_KEYS.items()
        if mapping.get(key) is not None
    }


# -- the user documentation ------------------------------------------------------------------------------------------
#: docs/options.md holds :func:`markdown_table` between these markers (written by cecai_converter.generate).
#: The begin marker still names the table's former module: it is text in docs/options.md, which stays as it is.
DOC_BEGIN: Final = "<!-- options table: generated from cecai_converter.option_table.OPTIONS -->"
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
