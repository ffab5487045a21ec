"""The batch file (``conversions.yaml``): which models, at which revisions, in which precisions, for which pairs.

A release workflow reads it through ``cecai-convert plan`` and fans the work out to runners that match each pair::

    defaults:                      # optional; every model inherits these
      precisions: [Q8_0, Q4_K_M]
      pairs: [CPU_LLM_LLAMA, GPU_LLM_LLAMA]
      fidelity-on: auto            # builder (default), check, or auto (check when a pair has a GPU)
    runner-labels:                 # optional; replaces a pair's default runner labels
      GPU_LLM_LLAMA: [self-hosted, linux, X64, gpu, cuda-12]
    models:
      - repo: TinyLlama/TinyLlama-1.1B-Chat-v1.0   # a Hugging Face repo id ...
        revision: fe8a4ea1ffedaf415f4da2f062534de366a451e6
        precisions: [Q4_K_M, Q5_K_M]              # optional; overrides defaults
      - path: models/my-finetune                  # ... or a folder, relative to this file
        name: my-finetune                         # optional; the stem of every output file
        pairs: [cpu, arm]
        fidelity-on: builder                      # optional; overrides defaults

Every key is checked: an unknown key is an error that names the closest known one, like the Converter configuration
(:mod:`cecai_converter.config`).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

from .backends import BACKENDS, RELEASE_CHECK_BACKEND
from .config import load_yaml_mapping
from .errors import ConfigError, UsageError
from .names import check_stem, control_character, show
from .pairs import DEFAULT_PAIR, PAIRS, PairInfo, parse_pair
from .precisions import PrecisionInfo, parse_precisions

__all__ = [
    "CHECK_KEYS",
    "DEFAULTS_KEYS",
    "FIDELITY_ON_CHOICES",
    "MODEL_KEYS",
    "TOP_KEYS",
    "Batch",
    "BatchModel",
    "PairCheck",
    "load_batch",
    "parse_batch",
]

#: Top-level keys and what they mean.
TOP_KEYS: Final[Mapping[str, str]] = {
    "version": "the format version; 1 (optional)",
    "defaults": "precisions and pairs every model inherits",
    "runner-labels": "pair -> list of runner labels, replacing that pair's defaults",
    "builder-labels": "runner labels of the make jobs, which convert and quantize once per model (default: the "
    f"{DEFAULT_PAIR} labels)",
    "check": "how each pair's runtime checks the files: backend, images, limits (see CHECK_KEYS)",
    "models": "the list of models to convert",
}
#: Keys of ``check`` (besides pair names, each mapping to ``{backend, image}`` for that pair).
CHECK_KEYS: Final[Mapping[str, str]] = {
    "backend": "docker (the pair's image; default) or local (the runtime installed on the pair's runner)",
    "max-kld": "largest KL-divergence between the builder's and the pair's runtime on one file (default 0.01)",
    "min-top1": "smallest top-1 agreement between the two runtimes (default 0.9)",
}
#: Keys of ``check.<PAIR>``.
CHECK_PAIR_KEYS: Final[Mapping[str, str]] = {
    "backend": "docker or local, for this pair",
    "image": "the image a docker check runs (default: the pair's published tag)",
}
#: Keys of ``defaults``.
DEFAULTS_KEYS: Final[Mapping[str, str]] = {
    "precisions": "one llama.cpp type or a list of them",
    "pairs": "one pair or a list of them (CPU_LLM_LLAMA or cpu, ...)",
    "fidelity-on": "where each file's fidelity is measured: builder (the make job; default), check (one check job, "
    "on its pair's runtime) or auto (check when one of the model's pairs offloads to a GPU, else builder)",
}
#: Keys of one entry under ``models``.
MODEL_KEYS: Final[Mapping[str, str]] = {
    "repo": "a Hugging Face repo id (owner/name)",
    "path": "a model folder, relative to the batch file",
    "revision": "the Hub revision to convert; a commit hash makes the release reproducible",
    "name": "the stem of every output file (default: the last part of repo or path)",
    "precisions": "overrides defaults.precisions",
    "pairs": "overrides defaults.pairs",
    "fidelity-on": "overrides defaults.fidelity-on",
}
#: ``fidelity-on``: where the files' fidelity is measured; ``auto`` is resolved per model by :mod:`.plan`, from the
#: pairs it plans.
FIDELITY_ON_CHOICES: Final = ("builder", "check", "auto")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class BatchModel:
    """One model of a batch, with its defaults applied.

    Attributes:
        name: the stem of every output file; unique within the batch.
        source: ``hub`` or ``local``.
        model: the repo id, or the folder path as the CLI should be given it (relative to the working directory
            the batch was loaded from, when possible).
        revision: the Hub revision, if given.
        precisions: the requested types, in the user's order.
        pairs: the pairs to convert for, in the user's order.
        fidelity_on: ``builder``, ``check`` or ``auto`` (see :data:`FIDELITY_ON_CHOICES`).
    """

    name: str
    source: str
    model: str
    revision: str | None
    precisions: tuple[PrecisionInfo, ...]
    pairs: tuple[PairInfo, ...]
    fidelity_on: str = "builder"


@dataclass(frozen=True)
class PairCheck:
    """How one pair's runtime checks the files a make job produced."""

    backend: str = RELEASE_CHECK_BACKEND
    image: str = ""


@dataclass(frozen=True)
class Batch:
    """A validated batch file.

    Attributes:
        path: where it was read from.
        models: the models, in file order.
        runner_labels: the runner labels for every pair (defaults from :data:`PAIRS`, overrides applied).
        builder_labels: the runner labels of the make jobs.
        checks: pair name → how its check runs.
        max_kld, min_top1: the agreement limits of every check (None: the check command's defaults).
    """

    path: Path
    models: tuple[BatchModel, ...]
    runner_labels: Mapping[str, tuple[str, ...]]
    builder_labels: tuple[str, ...] = PAIRS[DEFAULT_PAIR].runner_labels
    checks: Mapping[str, PairCheck] = field(default_factory=lambda: {name: PairCheck() for name in PAIRS})
    max_kld: float | None = None
    min_top1: float | None = None


def _unknown_key(key: object, known: Mapping[str, str], where: str) -> ConfigError:
    close = difflib.get_close_matches(str(key).lower(), list(known), n=1, cutoff=0.5)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"{where}: unknown key {key!r}.{suggestion}",
        hint="known keys: " + "; ".join(f"{k} ({v})" for k, v in known.items()),
    )


def _check_keys(data: Mapping[str, Any], known: Mapping[str, str], where: str) -> None:
    for key in data:
        if key not in known:
            raise _unknown_key(key, known, where)


def _mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected `key: value` lines (a mapping), found {show(value)}")
    return {str(k): v for k, v in value.items()}


def _string(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ConfigError(f"{where}: expected a non-empty string, got {show(value)}")
    text = str(value).strip()
    bad = control_character(text)
    if bad is not None:
        # A newline followed by `::warning::…` would become a workflow command wherever the value is printed.
        raise ConfigError(
            f"{where}: the value holds the control character {bad}: {show(text)}",
            hint="batch values are single-line text: remove line breaks, tabs and other control characters",
        )
    return text


def _parse_pairs(value: object, where: str) -> tuple[PairInfo, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ConfigError(f"{where}: the list is empty", hint=f"give at least one pair: {', '.join(PAIRS)}")
    found: dict[str, PairInfo] = {}
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: expected a pair name such as CPU_LLM_LLAMA, got {show(item)}")
        try:
            info = parse_pair(item)
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
        found.setdefault(info.name, info)
    return tuple(found.values())


def _parse_runner_labels(value: object, where: str) -> dict[str, tuple[str, ...]]:
    labels = {name: info.runner_labels for name, info in PAIRS.items()}
    for key, raw in _mapping(value, where).items():
        try:
            pair = parse_pair(key)
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
        labels[pair.name] = _labels(raw, f"{where}.{key}", pair.runner_labels)
    return labels


def _labels(raw: object, where: str, example: tuple[str, ...]) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    # fullmatch: `$` alone would let a trailing newline through
    if not items or not all(isinstance(x, str) and _LABEL.fullmatch(x) for x in items):
        raise ConfigError(
            f"{where}: expected a non-empty list of runner labels, got {show(raw)}",
            hint=f"for example: [{', '.join(example)}]",
        )
    return tuple(items)


def _limit(value: object, where: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise ConfigError(f"{where}: expected a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _parse_check(value: object, where: str) -> tuple[dict[str, PairCheck], float | None, float | None]:
    data = _mapping(value, where)
    pair_keys: dict[str, PairInfo] = {}
    for key in data:
        if key in CHECK_KEYS:
            continue
        try:
            pair_keys[key] = parse_pair(key)
        except UsageError:
            raise _unknown_key(key, {**CHECK_KEYS, **{p: "settings for this pair" for p in PAIRS}}, where) from None

    def backend_of(raw: object, here: str) -> str:
        backend = _string(raw, here).lower()
        if backend not in BACKENDS:
            raise ConfigError(f"{here}: expected {' or '.join(sorted(BACKENDS))}, got {raw!r}")
        return backend

    default_backend = backend_of(data["backend"], f"{where}.backend") if "backend" in data else RELEASE_CHECK_BACKEND
    checks = {name: PairCheck(backend=default_backend) for name in PAIRS}
    for key, pair in pair_keys.items():
        here = f"{where}.{key}"
        settings = _mapping(data[key], here)
        _check_keys(settings, CHECK_PAIR_KEYS, here)
        checks[pair.name] = PairCheck(
            backend=backend_of(settings["backend"], f"{here}.backend") if "backend" in settings else default_backend,
            image=_string(settings["image"], f"{here}.image") if settings.get("image") is not None else "",
        )
    return (
        checks,
        _limit(data.get("max-kld"), f"{where}.max-kld", 0.0, math.inf),
        _limit(data.get("min-top1"), f"{where}.min-top1", 0.0, 1.0),
    )


def _fidelity_on(value: object, where: str) -> str:
    choice = value.strip().lower() if isinstance(value, str) else None
    if choice not in FIDELITY_ON_CHOICES:
        raise ConfigError(
            f"{where}: expected {', '.join(FIDELITY_ON_CHOICES[:-1])} or {FIDELITY_ON_CHOICES[-1]}, got {show(value)}",
            hint="builder: the make job measures every file; check: one check job measures them on its pair's "
            "runtime (a GPU pair's first); auto: check when one of the model's pairs offloads to a GPU, else builder",
        )
    return str(choice)


def _local_model(value: str, base_dir: Path, where: str) -> str:
    posix = PurePosixPath(value.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise ConfigError(
            f"{where}: path {value!r} must be a folder inside the repository",
            hint="write it relative to the batch file, without '..'",
        )
    target = base_dir / Path(*posix.parts)
    # The CLI runs from the same working directory as `plan` (the checkout root): keep the path relative to it.
    try:
        return Path(os.path.relpath(target)).as_posix()
    except ValueError:  # another drive on Windows
        return target.as_posix()


def _parse_model(
    index: int,
    raw: object,
    defaults: Mapping[str, Any],
    base_dir: Path,
    where: str,
) -> BatchModel:
    here = f"{where}: models[{index}]"
    data = _mapping(raw, here)
    _check_keys(data, MODEL_KEYS, here)
    has_repo, has_path = data.get("repo") is not None, data.get("path") is not None
    if has_repo == has_path:
        raise ConfigError(
            f"{here}: give exactly one of `repo` (a Hugging Face repo id) or `path` (a folder)",
            hint="e.g. `- repo: TinyLlama/TinyLlama-1.1B-Chat-v1.0` or `- path: models/my-model`",
        )
    revision = None
    if has_repo:
        repo = _string(data["repo"], f"{here}.repo")
        if not _REPO_ID.match(repo):
            raise ConfigError(f"{here}.repo: {repo!r} is not a repo id", hint="write it as owner/name")
        source, model, default_name = "hub", repo, repo.split("/")[-1]
        if data.get("revision") is not None:
            revision = _string(data["revision"], f"{here}.revision")
    else:
        if data.get("revision") is not None:
            raise ConfigError(f"{here}: `revision` applies to `repo` models only; a folder has no revisions")
        path = _string(data["path"], f"{here}.path")
        source, model = "local", _local_model(path, base_dir, f"{here}.path")
        default_name = PurePosixPath(path.replace("\\", "/")).name
    if data.get("name") is not None:
        name = check_stem(_string(data["name"], f"{here}.name"), f"{here}.name", error=ConfigError)
    else:
        try:
            name = check_stem(default_name, f"{here}: the name taken from the {source} model", error=ConfigError)
        except ConfigError as exc:
            raise ConfigError(exc.message, hint=f"give the model a `name:`; {exc.hint}") from None
    precisions_raw = data.get("precisions", defaults.get("precisions"))
    if precisions_raw is None:
        raise ConfigError(
            f"{here} ({name}): no precisions",
            hint="set `precisions:` on the model or under `defaults:`, e.g. [Q8_0, Q4_K_M]",
        )
    pairs_raw = data.get("pairs", defaults.get("pairs"))
    if pairs_raw is None:
        raise ConfigError(
            f"{here} ({name}): no pairs",
            hint=f"set `pairs:` on the model or under `defaults:`; known pairs: {', '.join(PAIRS)}",
        )
    fidelity_on_raw = data.get("fidelity-on", defaults.get("fidelity-on"))
    return BatchModel(
        name=name,
        source=source,
        model=model,
        revision=revision,
        precisions=parse_precisions(precisions_raw, where=f"{here}.precisions"),
        pairs=_parse_pairs(pairs_raw, f"{here}.pairs"),
        fidelity_on="builder" if fidelity_on_raw is None else _fidelity_on(fidelity_on_raw, f"{here}.fidelity-on"),
    )


def parse_batch(data: Mapping[str, Any], path: Path) -> Batch:
    """Validate an already-loaded batch mapping; ``path`` names it in messages and anchors relative folders.

    Raises:
        ConfigError: an unknown key, a missing or malformed value, an unknown pair or precision, two models with
            the same name.
    """
    where = str(path)
    _check_keys(data, TOP_KEYS, where)
    version = data.get("version", 1)
    if version != 1:
        raise ConfigError(f"{where}: version {version!r} is not supported", hint="this release reads version: 1")
    defaults = _mapping(data.get("defaults"), f"{where}: defaults")
    _check_keys(defaults, DEFAULTS_KEYS, f"{where}: defaults")
    if "precisions" in defaults:
        parse_precisions(defaults["precisions"], where=f"{where}: defaults.precisions")
    if "pairs" in defaults:
        _parse_pairs(defaults["pairs"], f"{where}: defaults.pairs")
    if defaults.get("fidelity-on") is not None:
        _fidelity_on(defaults["fidelity-on"], f"{where}: defaults.fidelity-on")
    runner_labels = _parse_runner_labels(data.get("runner-labels"), f"{where}: runner-labels")
    builder_labels = (
        _labels(data["builder-labels"], f"{where}: builder-labels", PAIRS[DEFAULT_PAIR].runner_labels)
        if data.get("builder-labels") is not None
        else runner_labels[DEFAULT_PAIR]
    )
    checks, max_kld, min_top1 = _parse_check(data.get("check"), f"{where}: check")
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(
            f"{where}: `models` must be a non-empty list",
            hint="add e.g.\nmodels:\n  - repo: owner/name\n    revision: <commit>",
        )
    base_dir = path.parent
    models: list[BatchModel] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_models):
        model = _parse_model(index, raw, defaults, base_dir, where)
        if model.name in seen:
            raise ConfigError(
                f"{where}: models[{index}] and models[{seen[model.name]}] are both named {model.name!r}; "
                "their files would overwrite each other",
                hint="give one of them a different `name:`",
            )
        seen[model.name] = index
        models.append(model)
    return Batch(
        path=path,
        models=tuple(models),
        runner_labels=runner_labels,
        builder_labels=builder_labels,
        checks=checks,
        max_kld=max_kld,
        min_top1=min_top1,
    )


def load_batch(path: Path) -> Batch:
    """Read and validate a batch file.

    Raises:
        ConfigError: the file is missing, is not YAML, or is not a valid batch (see :func:`parse_batch`).
    """
    return parse_batch(load_yaml_mapping(path), path)
