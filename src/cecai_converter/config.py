"""The Converter folder contract: ``<NAME>/Converter/{configurations,models,outputs,logs}``.

Existing users keep this layout, so its keys and paths are frozen:

* ``configurations/converter_args.yaml``: IMAGE_NAME, MODEL_NAME, TRAINED, MODELS_PATH, LOGS_PATH, OUTPUTS_PATH
  (paths relative to ``configurations/``; defaults ``../models``, ``../logs``, ``../outputs``).
* ``configurations/<PAIR>/converter_args_<pair>.yaml``: PRECISION (one value or a list).

The conversion options' keys (KEEP_BASE, IMATRIX, THRESHOLDS, …) come from the one table,
:data:`cecai_converter.option_table.OPTIONS`, which also says what each takes.

The pair file is merged over the general file (the pair file wins). Newer optional keys are listed in
:data:`OPTIONAL_KEYS`; any other key is an error that names the closest known key.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from .errors import ConfigError, UsageError
from .names import check_stem, control_character, show
from .option_table import YAML_KEYS, check_yaml
from .pairs import PAIRS, PairInfo, parse_pair
from .precisions import PrecisionInfo, parse_precisions
from .request import Request

__all__ = [
    "GENERAL_FILENAME",
    "KNOWN_KEYS",
    "OPTIONAL_KEYS",
    "PairJob",
    "check_model_name",
    "check_writable_dir",
    "load_converter_dir",
    "load_yaml_mapping",
    "safe_child",
]

GENERAL_FILENAME: Final = "converter_args.yaml"

#: The keys of the original layout, with their meaning.
LEGACY_KEYS: Final[Mapping[str, str]] = {
    "IMAGE_NAME": "the container image that converts for this pair (docker backend)",
    "MODEL_NAME": "the model's folder under MODELS_PATH (`org/name` for a nested one); its last part is the stem of "
    "every output file",
    "TRAINED": "whether the model was fine-tuned by you (recorded in the manifest)",
    "MODELS_PATH": "folder holding the model folders, relative to configurations/ (default ../models)",
    "LOGS_PATH": "where logs go, relative to configurations/ (default ../logs)",
    "OUTPUTS_PATH": "where GGUF files go, relative to configurations/ (default ../outputs)",
    "PRECISION": "one llama.cpp type or a list of them (see `cecai-convert precisions`)",
}
#: Keys added by this project, all optional: the conversion options' keys from the one table (request.py).
OPTIONAL_KEYS: Final[Mapping[str, str]] = {key: spec.help for key, spec in YAML_KEYS.items()}
KNOWN_KEYS: Final[frozenset[str]] = frozenset(LEGACY_KEYS) | frozenset(OPTIONAL_KEYS)

_PATH_DEFAULTS: Final = {"MODELS_PATH": "../models", "LOGS_PATH": "../logs", "OUTPUTS_PATH": "../outputs"}


@dataclass(frozen=True)
class PairJob:
    """Everything one pair of a Converter folder asks for, with every path resolved.

    Attributes:
        pair: the hardware pair.
        converter_dir: the ``<NAME>/Converter`` folder.
        config_dir: its ``configurations/`` folder; relative paths in the YAML are relative to it.
        model_name: MODEL_NAME as written: the model's folder under MODELS_PATH, one name (``gpt2``) or nested
            (``org/name``); :attr:`stem`, its last part, names the output files.
        model_dir: ``MODELS_PATH/MODEL_NAME``.
        outputs_dir: ``OUTPUTS_PATH/<PAIR>``.
        logs_dir: ``LOGS_PATH/<PAIR>``.
        precisions: the requested types, in the user's order.
        image_name: IMAGE_NAME, if set.
        trained: TRAINED, if set.
        settings: the merged key/values as written (optional keys included), for the manifest.
        key_files: for each key of ``settings``, the file that set it (the pair file wins), which messages name.
    """

    pair: PairInfo
    converter_dir: Path
    config_dir: Path
    model_name: str
    model_dir: Path
    outputs_dir: Path
    logs_dir: Path
    precisions: tuple[PrecisionInfo, ...]
    image_name: str | None = None
    trained: bool | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    key_files: Mapping[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """The stem of every output file: MODEL_NAME, or its last part for a nested one (``org/name`` → ``name``)."""
        return self.model_name.rsplit("/", 1)[-1]

    @property
    def log_file(self) -> Path:
        """``logs/<PAIR>/Converter_<PAIR>_<MODEL_NAME>.log``, the name the old flow used."""
        return self.logs_dir / f"Converter_{self.pair.name}_{self.stem}.log"

    @property
    def pair_file(self) -> Path:
        """``configurations/<PAIR>/converter_args_<pair>.yaml``, which messages about this pair's keys name."""
        return self.config_dir / self.pair.name / self.pair.config_filename


def group_jobs(jobs: Sequence[tuple[PairJob, Request]]) -> list[list[tuple[PairJob, Request]]]:
    """Pairs that share one conversion: the same model and TRAINED, and requests that agree on everything but the
    per-target options (n_gpu_layers); they differ in PRECISION and IMAGE_NAME only. Order is kept."""
    groups: dict[tuple[str, str, bool | None, str], list[tuple[PairJob, Request]]] = {}
    for job, request in jobs:
        key = (str(job.model_dir), job.model_name, job.trained, request.group_key())
        groups.setdefault(key, []).append((job, request))
    return list(groups.values())


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping).

    Raises:
        ConfigError: the file is unreadable, is not valid YAML (the message gives line and column), or is not a
            mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"missing configuration file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{path}: invalid YAML{where}: {problem}",
            hint="YAML wants `KEY: value` lines; quote values that contain ':' or start with special characters",
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected `KEY: value` lines (a mapping), found a {type(data).__name__}")
    if _expands_beyond(data, _MAX_YAML_VALUES):
        raise ConfigError(
            f"{path}: the document expands to more than {_MAX_YAML_VALUES} values (through YAML aliases, `*name`)",
            hint="a configuration needs a few dozen values; write them out instead of nesting aliases",
        )
    return {str(k): v for k, v in data.items()}


#: More values than any configuration or batch file needs; a "billion laughs" document (aliases of aliases) is a
#: few lists in memory, but anything that walks it (a message, a hash, the manifest) would take gigabytes.
_MAX_YAML_VALUES: Final = 100_000


def _expands_beyond(data: object, limit: int) -> bool:
    """Whether walking ``data`` (aliases followed, as every later reader does) visits more than ``limit`` values."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return False


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (YAML keeps the last one silently)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer, refused past Python's 4,300 decimal digits (``int()`` raises ``ValueError`` there, and a
        hexadecimal one that large could not be shown in a message)."""
        try:
            value: int | None = super().construct_yaml_int(node)
        except ValueError:
            value = None
        if value is None or value.bit_length() > _MAX_INT_BITS:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"an integer of {len(str(node.value)):,} characters, more than the 4,300 digits this tool reads",
                node.start_mark,
            )
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<: *defaults` may be overridden; complex keys are refused by the base class
            key = self.construct_object(key_node)
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag == _INT_TAG:
                try:  # checked here, where the key is known, so the message can name it
                    self.construct_yaml_int(value_node)
                except yaml.constructor.ConstructorError as exc:
                    exc.problem = f"{show(key)}: {exc.problem}"
                    raise
            if key in first:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {show(key)} (first at line {first[key] + 1}); YAML would silently keep the last",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_INT_TAG: Final = "tag:yaml.org,2002:int"
# Python reads at most 4,300 decimal digits (sys.int_info.default_max_str_digits): about 14,284 bits.
_MAX_INT_BITS: Final = 14_000
_StrictLoader.add_constructor(_INT_TAG, _StrictLoader.construct_yaml_int)


def _check_keys(data: Mapping[str, Any], path: Path) -> None:
    for key in data:
        if key in KNOWN_KEYS:
            continue
        close = difflib.get_close_matches(key.upper(), sorted(KNOWN_KEYS), n=1, cutoff=0.5)
        suggestion = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"{path}: unknown key {key!r}.{suggestion}",
            hint=f"known keys: {', '.join(sorted(KNOWN_KEYS))}",
        )


def _expect(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], key_files: Mapping[str, str]) -> Any:
    """``data[key]`` when it is of ``kind`` (or absent); else a ConfigError naming the file that set it."""
    value = data.get(key)
    if value is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{key_files.get(key, 'the configuration')}: {key} must be a {names}, got {show(value)}")
    return value


def check_model_name(value: object, path: Path) -> str:
    """MODEL_NAME: one folder name (``gpt2``), or a nested one (``org/name``) whose every part is a plain name.

    The last part is the stem of the output files (:attr:`PairJob.stem`), so each part follows the one stem rule
    (:func:`cecai_converter.names.check_stem`): no ``.``/``..``, no absolute path, no hidden or odd names.

    Raises:
        ConfigError: naming the file and the key.
    """
    where = f"{path}: MODEL_NAME"
    if not isinstance(value, str) or "/" not in value:
        return check_stem(value, where, error=ConfigError)
    for part in value.split("/"):
        try:
            check_stem(part, where, error=ConfigError)
        except ConfigError as exc:
            raise ConfigError(
                f"{where} {show(value)} is not a folder inside MODELS_PATH: each '/'-separated part must be a plain "
                f"folder name, and {show(part)} is not",
                hint=f"{exc.hint}; a nested MODEL_NAME such as org/name names MODELS_PATH/org/name, and the output "
                "files are named after its last part",
            ) from None
    return value


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written: a file in the way, a read-only mount, an
    immutable or foreign folder. Nothing is created (the pipeline creates the folder when it writes).

    Raises:
        UsageError: naming ``what`` (``OUTPUTS_PATH``, ``--outdir``) and the path that is in the way.
    """
    probe = path
    while not probe.exists() and probe.parent != probe:
        if probe.is_symlink():
            raise UsageError(f"{what} {path}: {probe} is a broken symbolic link", hint="remove it or repoint it")
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(
            f"{what} {path}: {probe} is a file, not a folder",
            hint=f"move the file away or set {what} to a folder",
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(
            f"{what} {path}: cannot write in {probe} (read-only, immutable, or not yours)",
            hint=f"set {what} to a folder you can write to",
        )


def safe_child(parent: Path, name: str, *, key: str) -> Path:
    """``parent / name``, refusing names that are absolute or climb out of ``parent``.

    Raises:
        ConfigError: ``name`` is empty, absolute, or resolves outside ``parent``.
    """
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError(
            f"{key} {name!r} must be a folder name inside {parent}",
            hint=f"{key} names a folder under MODELS_PATH; it may not be absolute or contain '..'",
        )
    child = (parent / name).resolve()
    if not child.is_relative_to(parent.resolve()):
        raise ConfigError(f"{key} {name!r} resolves to {child}, outside {parent}")
    return child


def _discover_pairs(config_dir: Path) -> list[PairInfo]:
    found: list[PairInfo] = []
    for entry in sorted(config_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name not in PAIRS:
            close = difflib.get_close_matches(entry.name.upper(), list(PAIRS), n=1, cutoff=0.6)
            suggestion = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"{entry}: not a known pair folder.{suggestion}",
                hint=f"pair folders are named {', '.join(PAIRS)}",
            )
        found.append(PAIRS[entry.name])
    if not found:
        raise ConfigError(
            f"{config_dir} has no pair folders",
            hint="add e.g. configurations/CPU_LLM_LLAMA/converter_args_cpu_llm_llama.yaml with `PRECISION: Q4_K_M`",
        )
    return found


def load_converter_dir(
    converter_dir: Path,
    pairs: list[str] | None = None,
    *,
    path_overrides: Mapping[str, Path] | None = None,
) -> list[PairJob]:
    """Read a ``<NAME>/Converter`` folder and return one job per selected pair.

    Args:
        converter_dir: the folder holding ``configurations/``.
        pairs: pair names or slugs to run; ``None`` means every pair folder under ``configurations/``.
        path_overrides: MODELS_PATH / OUTPUTS_PATH / LOGS_PATH values that replace the YAML's (absolute, or
            relative to the working directory); the docker backend uses them for its mount points.

    Raises:
        UsageError: the folder or a file is missing.
        ConfigError: a file is malformed, holds an unknown key or precision, or MODEL_NAME escapes MODELS_PATH.
    """
    converter_dir = converter_dir.resolve()
    if not converter_dir.is_dir():
        raise UsageError(
            f"Converter folder not found: {converter_dir}",
            hint="pass the <NAME>/Converter folder that holds configurations/ and models/",
        )
    config_dir = converter_dir / "configurations"
    general_path = config_dir / GENERAL_FILENAME
    if not general_path.is_file():
        raise UsageError(
            f"missing {general_path}",
            hint="a Converter folder needs configurations/converter_args.yaml with at least MODEL_NAME",
        )
    general = load_yaml_mapping(general_path)
    _check_keys(general, general_path)

    selected = [parse_pair(p) for p in pairs] if pairs else _discover_pairs(config_dir)
    jobs: list[PairJob] = []
    for pair in dict.fromkeys(selected):
        pair_path = config_dir / pair.name / pair.config_filename
        if not pair_path.is_file():
            raise UsageError(
                f"missing {pair_path}",
                hint=f"create it with a PRECISION key, e.g. `PRECISION: [Q8_0, Q4_K_M]`, or drop --pair {pair.name}",
            )
        pair_data = load_yaml_mapping(pair_path)
        _check_keys(pair_data, pair_path)
        merged = {**general, **pair_data}
        key_files = {key: str(pair_path if key in pair_data else general_path) for key in merged}
        job = _make_job(
            pair, converter_dir, config_dir, merged, general_path, pair_path, path_overrides or {}, key_files
        )
        jobs.append(job)
    return jobs


def _make_job(
    pair: PairInfo,
    converter_dir: Path,
    config_dir: Path,
    merged: dict[str, Any],
    general_path: Path,
    pair_path: Path,
    path_overrides: Mapping[str, Path],
    key_files: Mapping[str, str],
) -> PairJob:
    model_name = merged.get("MODEL_NAME")
    if model_name is None or model_name == "":
        raise ConfigError(f"{general_path}: MODEL_NAME is required", hint="MODEL_NAME: gpt2")
    model_name = check_model_name(model_name, general_path)
    if "PRECISION" not in merged:
        raise ConfigError(
            f"{pair_path}: PRECISION is required",
            hint="e.g. `PRECISION: Q4_K_M` or `PRECISION: [F16, Q8_0, Q4_K_M]`",
        )
    precisions = parse_precisions(merged["PRECISION"], where=f"{pair_path.name}: PRECISION")
    paths: dict[str, Path] = {}
    for key, default in _PATH_DEFAULTS.items():
        value = _expect(merged, key, str, key_files) or default
        if (bad := control_character(value)) is not None:  # a NUL is a ValueError in every path call
            raise ConfigError(f"{key_files.get(key, 'the configuration')}: {key} holds the control character {bad}")
        override = path_overrides.get(key)
        paths[key] = Path(override).resolve() if override is not None else (config_dir / value).resolve()
    _expect(merged, "TRAINED", bool, key_files)
    _expect(merged, "IMAGE_NAME", str, key_files)
    # The option keys are checked now, not after the conversion: a mistake costs nothing, and counts with FIDELITY
    # off too (THRESHOLDS). The table in request.py says what each key takes.
    parsed = check_yaml(merged, key_files, config_dir)
    if "thresholds" in parsed:
        merged["THRESHOLDS"] = parsed["thresholds"]  # keyed by canonical names (q4_k_m → Q4_K_M), as written back
    model_dir = safe_child(paths["MODELS_PATH"], model_name, key="MODEL_NAME")
    for key in ("OUTPUTS_PATH", "LOGS_PATH"):
        # Files written into the model folder would change its fingerprint (every run converts again) and could
        # overwrite the input; a folder around the model folder is fine (the fingerprint covers the model only).
        if paths[key].is_relative_to(model_dir):
            raise ConfigError(
                f"{general_path}: {key} {paths[key]} is inside the model folder {model_dir}",
                hint=f"outputs and logs never go into the input: set {key} outside MODELS_PATH/MODEL_NAME "
                f"(default {_PATH_DEFAULTS[key]})",
            )
        check_writable_dir(paths[key] / pair.name, key)
    return PairJob(
        pair=pair,
        converter_dir=converter_dir,
        config_dir=config_dir,
        model_name=model_name,
        model_dir=model_dir,
        outputs_dir=paths["OUTPUTS_PATH"] / pair.name,
        logs_dir=paths["LOGS_PATH"] / pair.name,
        precisions=precisions,
        image_name=merged.get("IMAGE_NAME"),
        trained=merged.get("TRAINED"),
        settings=dict(merged),
        key_files=dict(key_files),
    )
