"""Check records: ``<model>.<pair slug>.check.json``, what ``cecai-convert check`` writes about one pair's runtime.

A record says whether a builder's files passed on a pair's runtime (``passed``), on which runtime (``runtime``),
within which limits (``limits``), and per file (``files``: one :class:`CheckRow` each) the SHA-256, the agreement
with the builder's runtime, the fidelity where it was measured there, and the problems found. ``check`` builds a
:class:`CheckRecord` and writes :meth:`CheckRecord.to_dict`; every reader (the card, the job summary, the release)
reads one through :func:`read_records` (files someone else wrote: bounded, then checked by
:func:`check_record_problem`) and uses its attributes. A published manifest carries its pairs' records under
``checks`` (see :attr:`cecai_converter.manifest.Manifest.check_records`).

:meth:`CheckRecord.from_dict` types a record without judging it: records handed to a renderer (the card's
``--checks``, a test's hand-written one) may be partial, so every field is optional, and a reader checks the one it
needs. Fields that :func:`check_record_problem` checks have their type once a record passed it; the others are typed
``Any``: they are kept as written (the round trip ``from_dict(d).to_dict() == d`` holds for any record whose ``files``
are objects). Readers ask for the objects among them (a row's ``agreement``, ``image`` and ``fidelity``, the record's
``runtime``) through the ``*_record`` properties, typed as :mod:`cecai_converter.manifest_fields` types a manifest's
(:class:`Agreement`, :class:`ShownImage`, :class:`CheckRuntime`), so that no reader looks fields up by string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .errors import CheckFailed, ConfigError, ConverterError, UsageError
from .manifest_fields import Fidelity, read_fields, read_object
from .pairs import PairInfo
from .untrusted_json import load_bounded_file

__all__ = [
    "CHECK_SCHEMA",
    "MAX_RECORD_BYTES",
    "Agreement",
    "CheckRecord",
    "CheckRow",
    "CheckRuntime",
    "ShownImage",
    "check_record_problem",
    "failure_message",
    "read_record",
    "read_records",
    "record_name",
]

CHECK_SCHEMA: Final = 1

#: The largest check record read: one is a few kilobytes per file checked.
MAX_RECORD_BYTES: Final = 4 * 1024 * 1024

_HINT: Final = "pass the records the check jobs wrote, unedited; re-run a pair's check to rewrite its record"


def record_name(model_name: str, pair: PairInfo) -> str:
    """The check record's file name: ``<model>.<pair slug>.check.json``."""
    return f"{model_name}.{pair.slug}.check.json"


def _fields_dict(obj: Any, names: Sequence[str], absent: frozenset[str]) -> dict[str, Any]:
    """The JSON object of ``obj``: each field in declaration order, a None left out where the source had no key."""
    return {n: v for n in names if (v := getattr(obj, n)) is not None or n not in absent}


@dataclass(frozen=True)
class Agreement:
    """A row's ``agreement``, typed (``agreement.Agreement.as_dict``): the pair's runtime against the builder's on
    the same file, and how fast and large it ran. Read as :mod:`cecai_converter.manifest_fields` reads a manifest's
    objects: a field absent or of another type reads as None."""

    kld_mean: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    n_positions: int | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    peak_rss_mib: float | None = None
    offloaded_layers: int | None = None
    total_layers: int | None = None


@dataclass(frozen=True)
class ShownImage:
    """A projector row's ``image``, typed (``multimodal.ImageCheck.as_dict`` and the text file it ran with,
    ``model``): the test image shown through the projector."""

    runtime: str | None = None
    mmproj: str | None = None
    image: str | None = None
    prompt: str | None = None
    image_tokens: int | None = None
    embedding_values: int | None = None
    embedding_rms: float | None = None
    generated_tokens: tuple[int, ...] = ()
    text: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class CheckRuntime:
    """A record's ``runtime``, typed (``runtime.runtime_facts`` and where the check ran: ``backend``, ``image``)."""

    device: str | None = None
    machine: str | None = None
    llama_cpp_python: str | None = None
    gpu_offload: bool | None = None
    n_gpu_layers: int | None = None
    backend: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class CheckRow:
    """One file of a check record (``files[i]``).

    Attributes:
        name: the file name in the builder's outputs folder.
        precision: its precision (``Q8_0``; the projector's for an ``mmproj`` row).
        role: ``mmproj`` for a vision model's projector file; None (no key) for a text file.
        sha256: the SHA-256 of the bytes checked.
        sha256_match: whether those are the builder's bytes (the manifest's and the reference's).
        problems: what failed on this file.
        generated_tokens: how many tokens the runtime generated from it (text files that loaded).
        agreement: against the builder's runtime: ``kld_mean``, ``kld_max``, ``top1_agreement``, ``prompt_tps``,
            ``gen_tps``, ``peak_rss_mib``, ``offloaded_layers``, ``total_layers`` (``agreement.Agreement``).
        image: the test image shown through a projector (``image_tokens``, ``generated_tokens``, ``model``).
        fidelity: the file's fidelity measured on this runtime (FIDELITY_ON=check), as the builder records it.
        passed: whether the file passed.
        extra: keys this version does not know, kept for the round trip.
    """

    name: str | None = None
    precision: Any = None
    role: Any = None
    sha256: str | None = None
    sha256_match: Any = None
    problems: list[Any] | None = None
    generated_tokens: Any = None
    agreement: dict[str, Any] | None = None
    image: Any = None
    fidelity: dict[str, Any] | None = None
    passed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: keys the source object did not have (left out again by ``to_dict``, not written as null)
    absent: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckRow:
        """A row from its JSON object (not judged: see :func:`check_record_problem`)."""
        return cls(
            **{k: data[k] for k in _ROW_FIELDS if k in data},
            extra={k: v for k, v in data.items() if k not in _ROW_FIELDS},
            absent=frozenset(_ROW_FIELDS) - data.keys(),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as written."""
        return {**_fields_dict(self, _ROW_FIELDS, self.absent), **self.extra}

    @property
    def agreement_record(self) -> Agreement | None:
        """``agreement``, typed; None when the row has none (absent, empty, or not an object)."""
        return read_object(Agreement, self.agreement or None)

    @property
    def image_record(self) -> ShownImage | None:
        """``image`` (projector rows), typed; None when the row has none (absent, empty, or not an object)."""
        return read_object(ShownImage, self.image or None)

    @property
    def fidelity_record(self) -> Fidelity | None:
        """``fidelity`` (measured on this runtime, FIDELITY_ON=check), typed; None when it is not an object."""
        return read_object(Fidelity, self.fidelity)

    def vouches_for(self, sha256: str | None) -> bool:
        """As the card and the release judge a row: it says passed, lists no problem, and checked these bytes."""
        return self.passed is True and not self.problems and self.sha256 == sha256


@dataclass(frozen=True)
class CheckRecord:
    """``<model>.<pair slug>.check.json`` (schema :data:`CHECK_SCHEMA`), or a published manifest's ``checks[pair]``.

    Attributes:
        schema: the format version.
        tool: ``{"name", "version"}`` of the writer.
        pair: the pair whose runtime this is.
        model_name: the model whose files were checked (None: a record that names none).
        passed: whether every file passed and the check itself had no problem.
        runtime: the runtime checked on: ``device``, ``machine``, ``llama_cpp_python``, ``n_gpu_layers``, ``backend``
            and ``image`` (``runtime.runtime_facts``).
        reference_runtime: the builder's runtime, as its ``reference.json`` names it.
        limits: ``max_kld`` and ``min_top1`` (``check.Limits``).
        problems: what failed outside any one file (a GPU pair without offload, a runtime crash).
        fidelity: FIDELITY_ON=check: what was measured here (``measured``, ``reason``, ``base``, ``base_sha256``,
            ``device``); None when the builder did not ask for it.
        files: one row per file checked.
        extra: keys this version does not know, kept for the round trip.
    """

    schema: Any = None
    tool: Any = None
    pair: str | None = None
    model_name: str | None = None
    passed: bool | None = None
    runtime: dict[str, Any] | None = None
    reference_runtime: Any = None
    limits: Any = None
    problems: list[Any] | None = None
    fidelity: dict[str, Any] | None = None
    files: list[CheckRow] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: keys the source object did not have (left out again by ``to_dict``, not written as null)
    absent: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckRecord:
        """A record from its JSON object, typed but not judged (see :func:`check_record_problem`); rows that are not
        objects are left out (a record :func:`read_records` accepted has none)."""
        values = {k: data[k] for k in _RECORD_FIELDS if k in data and k != "files"}
        rows = data.get("files")
        return cls(
            **values,
            files=None if rows is None else [CheckRow.from_dict(r) for r in rows if isinstance(r, Mapping)],
            extra={k: v for k, v in data.items() if k not in _RECORD_FIELDS},
            absent=frozenset(_RECORD_FIELDS) - data.keys(),
        )

    @classmethod
    def of(cls, record: CheckRecord | Mapping[str, Any]) -> CheckRecord:
        """``record`` typed: a :class:`CheckRecord` as it is, a JSON object through :meth:`from_dict`."""
        return record if isinstance(record, CheckRecord) else cls.from_dict(record)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, exactly as written (``from_dict(r.to_dict()) == r``)."""
        out = _fields_dict(self, _RECORD_FIELDS, self.absent)
        if self.files is not None:
            out["files"] = [row.to_dict() for row in self.files]
        return {**out, **self.extra}

    @property
    def runtime_record(self) -> CheckRuntime:
        """``runtime``, typed (every field None when it is not recorded)."""
        return read_fields(CheckRuntime, self.runtime)

    @property
    def rows(self) -> list[CheckRow]:
        """The rows (none when the record has no ``files``)."""
        return list(self.files or [])

    def rows_by_name(self) -> dict[str, CheckRow]:
        """The rows by file name."""
        return {str(row.name): row for row in self.rows}


_ROW_FIELDS: Final = tuple(f.name for f in dataclasses.fields(CheckRow) if f.name not in ("extra", "absent"))
_RECORD_FIELDS: Final = tuple(f.name for f in dataclasses.fields(CheckRecord) if f.name not in ("extra", "absent"))


def failure_message(record: CheckRecord) -> str:
    """One line per problem, each naming the pair and the file."""
    pair = record.pair
    lines = [f"{pair}: {p}" for p in record.problems or []]
    for row in record.rows:
        lines += [f"{pair}: {row.name}: {p}" for p in row.problems or []]
    return "; ".join(lines) or f"{pair}: the check did not pass"


_RECORD_KEYS: Final = (
    ("pair", str, "a string"),
    ("passed", bool, "true or false"),
    ("runtime", dict, "an object"),
    ("files", list, "a list"),
    ("problems", list, "a list"),
    ("model_name", str, "a string"),
    ("fidelity", dict, "an object"),
)
_RECORD_ROW_KEYS: Final = (
    ("name", str, "a string"),
    ("sha256", str, "a string"),
    ("passed", bool, "true or false"),
    ("agreement", dict, "an object"),
    ("fidelity", dict, "an object"),
    ("problems", list, "a list"),
)


def check_record_problem(record: object, *, complete: bool = False) -> tuple[str, str] | None:
    """The first field of a check record (``cecai-convert check``) that the publisher would trip over, as
    ``(field, why)`` (field ``""``: the record itself); None when it is sound.

    Fields that are present must have their type; with ``complete``, ``pair``, ``passed``, ``runtime`` and
    ``files`` must also be there (a record as ``check`` writes it, not one already merged into a manifest).
    """
    if not isinstance(record, dict):
        return "", "expected an object"
    for key, kind, what in _RECORD_KEYS:
        value = record.get(key)
        if value is None and (not complete or key in ("problems", "model_name", "fidelity")):
            continue
        if not isinstance(value, kind):
            return key, f"expected {what}, found {type(value).__name__}"
    for i, row in enumerate(record.get("files") or []):
        if not isinstance(row, dict):
            return f"files[{i}]", "expected an object"
        for key, kind, what in _RECORD_ROW_KEYS:
            if row.get(key) is not None and not isinstance(row[key], kind):
                return f"files[{i}].{key}", f"expected {what}, found {type(row[key]).__name__}"
    return None


def read_record(path: Path, error: type[ConverterError] = CheckFailed) -> dict[str, Any]:
    """A check record's JSON through the bounded JSON reader; ``error`` when unreadable (``CheckFailed``: the
    container left none), ConfigError when it is JSON but no check record."""
    data = load_bounded_file(
        path,
        what=f"check record {path}",
        max_bytes=MAX_RECORD_BYTES,
        allow_nan=True,  # a record's measurements may be NaN or infinite (a broken runtime): our writer keeps them
        error=error,
        hint=_HINT,
    )
    if not isinstance(data, dict) or type(data.get("schema")) is not int or data.get("schema") != CHECK_SCHEMA:
        raise ConfigError(f"{path}: not a cecai-converter check record")
    return data


def read_records(paths: Sequence[Path]) -> list[CheckRecord]:
    """Check records from files and folders (every ``*.check.json`` below a folder).

    Raises:
        UsageError: a path is missing or holds something other than a check record.
    """
    found: list[Path] = []
    for item in paths:
        if item.is_dir():
            found += sorted(item.rglob("*.check.json"))
        elif item.is_file():
            found.append(item)
        else:
            raise UsageError(f"check records: {item} does not exist")
    records = []
    for path in found:
        data = read_record(path, UsageError)
        problem = check_record_problem(data, complete=True)
        if problem is not None:  # refused here, before publish uploads anything or renders a table from it
            where, why = problem
            raise UsageError(
                f"{path}: {where or 'the record'}: {why}; not a check record as `cecai-convert check` writes it",
                hint=_HINT,
            )
        records.append(CheckRecord.from_dict(data))
    return records
