"""``manifest.json``: what a run produced, from what, with which llama.cpp, and how long it took.

It is also the memory of no-work re-runs: each file entry carries the ``inputs_key`` it was made from, and the
size and modification time it had when published, so an unchanged re-run can trust it without re-hashing.

Every reader goes through :class:`Manifest`: :meth:`Manifest.from_dict` checks the fields readers rely on and
refuses bad input with a :class:`~cecai_converter.errors.ManifestError` that names the field, and
:meth:`Manifest.to_dict` gives back exactly the JSON it came from (keys it does not know, written by a newer
version, are kept in ``extra``). The published ``<model>[.<slug>].manifest.json`` (see
``release.manifests.release_manifest``) is the same document without host paths and mtimes, plus ``checks``; it is read
through the same class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import __version__
from .errors import ManifestError, UsageError
from .fsutil import atomic_write_json
from .manifest_fields import (
    Base,
    EvalText,
    Fidelity,
    Imatrix,
    Multimodal,
    RequestValues,
    Source,
    Tool,
    Toolchain,
    Verification,
    read_fields,
    read_object,
)
from .names import check_plain_name, check_stem, show
from .output import get_logger
from .parity_record import record_problem
from .quant_types import quantization_problem
from .records import CheckRecord, check_record_problem
from .untrusted_json import load_bounded_file

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA",
    "FileEntry",
    "Manifest",
    "file_is_current",
    "inputs_key",
    "load_manifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME: Final = "manifest.json"
SCHEMA: Final = 1

#: The largest manifest read: a model of thousands of files with every record is a few megabytes.
MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024
_HINT: Final = "a manifest is written by `cecai-convert convert`; convert again instead of editing it"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class FileEntry:
    """One GGUF file of a manifest (``files[i]``).

    Attributes:
        name: the file name, in the manifest's folder.
        precision: the precision name (``Q4_K_M``).
        bytes: the file's size.
        sha256: hex digest of its bytes.
        mtime_ns: its modification time when published (builder manifests only; the published one drops it).
        inputs_key: what its bytes were made from (no-work re-runs).
        tensor_count, architecture, file_type, n_params: read back from the file.
        bpw: bits per weight (bytes × 8 / parameters).
        quantization: what llama.cpp wrote (``quant_types.quantization_record``): ``types`` (type → ``tensors``,
            ``bytes``), ``bpw`` of the tensor data, ``fallbacks`` (``tensor``, ``asked``, ``written``, ``reason``)
            and ``overrides`` (the TENSOR_TYPES rules applied).
        verification: the load-and-generate record (``runtime``, ``generated_tokens``, ``text``...).
        fidelity: KL-divergence, perplexity, top-1 and speed against the base; a mapping so that keys added later
            (error bars...) are kept as written.
        reused: whether the file came from an earlier run.
        extra: keys this version does not know, kept for the round trip.
    """

    name: str
    precision: str
    bytes: int
    sha256: str
    mtime_ns: int | None = None
    inputs_key: str | None = None
    tensor_count: int | None = None
    architecture: str | None = None
    file_type: int | None = None
    n_params: int | None = None
    bpw: float | None = None
    quantization: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    reused: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: optional keys the source document did not have (left out again by ``to_dict``, not written as null)
    absent: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileEntry:
        """A file entry from its JSON object (checked by :meth:`Manifest.from_dict`)."""
        known = {f.name for f in _ENTRY_FIELDS}
        values = {k: data[k] for k in known if k in data}
        return cls(
            **values,
            extra={k: v for k, v in data.items() if k not in known},
            absent=frozenset(_ENTRY_OPTIONAL - data.keys()),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as written."""
        out: dict[str, Any] = {}
        for f in _ENTRY_FIELDS:
            value = getattr(self, f.name)
            if value is not None or f.name not in self.absent:
                out[f.name] = value
        return {**out, **self.extra}

    @property
    def fidelity_record(self) -> Fidelity | None:
        """``fidelity``, typed (None when the file was not measured)."""
        return read_object(Fidelity, self.fidelity)

    @property
    def verification_record(self) -> Verification | None:
        """``verification``, typed (None when the file was not verified)."""
        return read_object(Verification, self.verification)

    def without_host_facts(self) -> FileEntry:
        """The entry as published: no modification time (it means nothing on another machine)."""
        return dataclasses.replace(self, mtime_ns=None, absent=self.absent | {"mtime_ns"})


_ENTRY_FIELDS: Final = tuple(f for f in dataclasses.fields(FileEntry) if f.name not in ("extra", "absent"))
_ENTRY_OPTIONAL: Final = frozenset(
    f.name for f in _ENTRY_FIELDS if (f.default, f.default_factory) != (dataclasses.MISSING, dataclasses.MISSING)
)


def _type_check(hint: object) -> Callable[[object], bool]:
    """What a JSON value must be to hold a field declared ``hint`` (``X | None``: an ``X``; None is judged by the
    caller): ``int`` a whole number (not a bool), ``float`` any number, a ``dict[...]`` an object."""
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = typing.get_origin(hint) or hint
    if kind is int:
        return _is_int
    if kind is float:
        return _is_number
    assert isinstance(kind, type), hint  # a field type no manifest check knows: declare it, or check it by hand
    return lambda value: isinstance(value, kind)


#: files[i] (and mmproj[i]): (key, required, type check), derived from FileEntry's declarations so that the two
#: cannot drift. ``name`` (a plain file name) and ``quantization`` (quant_types' record) have checks of their own.
_ENTRY_CHECKS: Final = tuple(
    (f.name, f.name not in _ENTRY_OPTIONAL, _type_check(typing.get_type_hints(FileEntry)[f.name]))
    for f in _ENTRY_FIELDS
    if f.name not in ("name", "quantization")
)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` (schema 1; see ``docs/ARCHITECTURE.md``), or a published ``*.manifest.json``.

    Attributes:
        schema: the format version (:data:`SCHEMA`).
        tool: ``{"name", "version"}`` of the writer.
        toolchain: the llama.cpp the files were made with.
        pair: the pair's name, None for a pair-less run.
        model_name: the stem of the file names.
        trained: TRAINED from the Converter folder.
        source: where the model came from (``kind`` local or hub, ``fingerprint``, ``path``/``files`` or
            ``repo_id``/``revision``).
        base: ``{"precision", "kept"}``.
        imatrix: the importance matrix's record, or None.
        files: the GGUF files.
        timings: ``convert_s``, ``quantize_s`` (per precision), ``verify_s`` and ``fidelity_s`` (per runtime
            label: ``all`` or ``n_gpu_layers=N``), ``fidelity_base_tokens`` (per runtime label: the base's positions
            evaluated in this run, 0 when fidelity's cache had them), ``total_s``.
        runtime: ``{"n_gpu_layers"}`` the files were verified and measured with.
        inputs_key: a whole-run key, where a writer records one.
        checks: published manifests only: pair name → check record.
        multimodal: towers beyond the text model (``towers``, ``projector``, ``text_only``, ``left_out``; see
            ``multimodal.plan_towers``), None for a text model.
        mmproj: the projector files (``mmproj-<model>-f16.gguf``…) written next to the text files; None without.
        source_parity: the base's comparison with its source model (``checked``, ``passed``, ``failures``,
            ``tokenizer``, ``chat_template``, ``hyperparameters``, ``logits``; see ``source_parity.SourceParity``).
        fidelity_on: where the files' fidelity is measured (FIDELITY_ON): ``builder`` (each file's ``fidelity``,
            with its ``device``), ``check`` (the check jobs; ``base`` then names the base GGUF shipped for them, and
            a published file's ``fidelity`` says which pair measured it), or None when fidelity is off.
        extra: keys this version does not know, kept for the round trip.
        path: where it was read from or written to (not part of the document).
    """

    schema: int = SCHEMA
    tool: dict[str, Any] | None = None
    toolchain: dict[str, Any] | None = None
    pair: str | None = None
    model_name: str | None = None
    trained: bool | None = None
    source: dict[str, Any] | None = None
    base: dict[str, Any] | None = None
    imatrix: dict[str, Any] | None = None
    files: list[FileEntry] = field(default_factory=list)
    timings: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None
    inputs_key: str | None = None
    checks: dict[str, dict[str, Any]] | None = None
    multimodal: dict[str, Any] | None = None
    mmproj: list[FileEntry] | None = None
    source_parity: dict[str, Any] | None = None
    fidelity_on: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    absent: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, data: object, *, path: Path | None = None) -> Manifest:
        """Check ``data`` (parsed JSON) and type it.

        Raises:
            ManifestError: the first field readers would trip over, as ``field: why`` (prefixed by ``path``).
        """
        problem = _manifest_problem(data)
        if problem is not None:
            raise ManifestError(f"{path}: {problem}" if path is not None else problem, hint=_HINT)
        assert isinstance(data, dict)  # _manifest_problem refuses anything else
        known = {f.name for f in _MANIFEST_FIELDS}
        values = {k: data[k] for k in known if k in data and k not in ("files", "mmproj")}
        mmproj = data.get("mmproj")
        return cls(
            **values,
            files=[FileEntry.from_dict(e) for e in data.get("files", [])],
            mmproj=None if mmproj is None else [FileEntry.from_dict(e) for e in mmproj],
            extra={k: v for k, v in data.items() if k not in known},
            absent=frozenset(_MANIFEST_OPTIONAL - data.keys()),
            path=path,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, exactly as written (``from_dict(m.to_dict()) == m``)."""
        out: dict[str, Any] = {}
        for f in _MANIFEST_FIELDS:
            value = getattr(self, f.name)
            if f.name == "files":
                if "files" not in self.absent or value:
                    out["files"] = [e.to_dict() for e in value]
            elif f.name == "mmproj":
                if value is not None or "mmproj" not in self.absent:
                    out["mmproj"] = None if value is None else [e.to_dict() for e in value]
            elif value is not None or f.name not in self.absent:
                out[f.name] = value
        return {**out, **self.extra}

    # -- what readers ask -----------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether the document has ``key`` (a null value counts; a key it never had does not)."""
        return key in self.to_dict()

    @property
    def folder(self) -> Path | None:
        """The folder the manifest is in (its files are next to it), when it was read from disk."""
        return None if self.path is None else self.path.parent

    def by_precision(self) -> dict[str, FileEntry]:
        """Entries by precision name."""
        return {e.precision: e for e in self.files}

    @property
    def source_record(self) -> Source:
        """``source``, typed (every field None when it is not recorded)."""
        return read_fields(Source, self.source)

    @property
    def base_record(self) -> Base:
        """``base``, typed."""
        return read_fields(Base, self.base)

    @property
    def imatrix_record(self) -> Imatrix | None:
        """``imatrix``, typed (None when the files were quantized without one)."""
        return read_object(Imatrix, self.imatrix)

    @property
    def multimodal_record(self) -> Multimodal | None:
        """``multimodal``, typed (None for a text model)."""
        return read_object(Multimodal, self.multimodal)

    @property
    def tool_record(self) -> Tool:
        """``tool``, typed."""
        return read_fields(Tool, self.tool)

    @property
    def toolchain_record(self) -> Toolchain:
        """``toolchain``, typed."""
        return read_fields(Toolchain, self.toolchain)

    @property
    def eval_text_record(self) -> EvalText | None:
        """``eval_text`` (a key this version does not write, kept in ``extra``), typed; None when it is not an
        object."""
        return read_object(EvalText, self.extra.get("eval_text"))

    @property
    def request(self) -> dict[str, Any] | None:
        """``request`` (``request.Request.record``: ``values`` and ``sources``; kept in ``extra``) as written; None
        when the run recorded none."""
        value = self.extra.get("request")
        return value if isinstance(value, dict) else None

    @property
    def request_values(self) -> RequestValues:
        """``request.values``, typed (every field None when the run recorded no request)."""
        return read_fields(RequestValues, (self.request or {}).get("values"))

    @property
    def check_records(self) -> dict[str, CheckRecord]:
        """Published manifests: pair → its check record, typed (``checks``; empty without)."""
        return {pair: CheckRecord.from_dict(record) for pair, record in (self.checks or {}).items()}

    @property
    def n_gpu_layers(self) -> int | None:
        """The runtime setting the files were verified with."""
        value = (self.runtime or {}).get("n_gpu_layers")
        return value if _is_int(value) else None

    @property
    def source_path(self) -> str | None:
        """The local source folder (builder manifests of a local model)."""
        value = (self.source or {}).get("path")
        return value if isinstance(value, str) else None

    @property
    def source_files(self) -> list[dict[str, Any]]:
        """The local source's file records (``path``, ``bytes``, ``mtime_ns``, ``sha256``)."""
        return list((self.source or {}).get("files") or [])

    def seconds(self, key: str) -> dict[str, float]:
        """A per-label timing (``quantize_s`` per precision; ``verify_s``/``fidelity_s`` per runtime label)."""
        value = (self.timings or {}).get(key)
        if not isinstance(value, dict):
            return {}
        return {str(k): float(v) for k, v in value.items() if _is_number(v)}

    def total_seconds(self, key: str) -> float | None:
        """A single timing (``convert_s``, ``total_s``), when recorded."""
        value = (self.timings or {}).get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


#: fidelity.budget: how the error-bar budget was set and where it stopped (fidelity.measure_run).
_BUDGET_MODES: Final = ("auto", "all")
_BUDGET_STOPS: Final = ("target", "text_end", "all")


def _fidelity_problem(record: object) -> str | None:
    """What is wrong with a file's ``fidelity`` record (the field and why), or None. Records of earlier versions
    (no ``budget``) are fine; the numbers themselves are free-form (a mapping kept as written)."""
    if not isinstance(record, dict):
        return None
    n_tokens = record.get("n_tokens")
    if n_tokens is not None and not (isinstance(n_tokens, int) and _is_int(n_tokens) and n_tokens >= 0):
        return "n_tokens: expected a whole number ≥ 0"
    budget = record.get("budget")
    if budget is None:
        return None
    if not isinstance(budget, dict):
        return "budget: expected a mapping"
    if budget.get("mode") not in _BUDGET_MODES:
        return f"budget.mode: expected one of {', '.join(_BUDGET_MODES)}"
    if budget.get("stopped") not in _BUDGET_STOPS:
        return f"budget.stopped: expected one of {', '.join(_BUDGET_STOPS)}"
    text_tokens = budget.get("text_tokens")
    if not (isinstance(text_tokens, int) and _is_int(text_tokens) and text_tokens >= 0):
        return "budget.text_tokens: expected a whole number ≥ 0"
    if isinstance(n_tokens, int) and n_tokens > text_tokens:
        return "n_tokens: more positions than the text has (budget.text_tokens)"
    for key in (
        "target",
        "kld_se_floor",
        "top1_se_max",
        "kld_rel_se",
        "kld_mean_se_chunks",
        "top1_agreement_se_chunks",
    ):
        if budget.get(key) is not None and not _is_number(budget[key]):
            return f"budget.{key}: expected a number"
    for key in ("min_tokens", "min_chunks", "chunks"):
        value = budget.get(key)
        if value is not None and not (isinstance(value, int) and _is_int(value) and value >= 0):
            return f"budget.{key}: expected a whole number ≥ 0"
    return None


_MANIFEST_FIELDS: Final = tuple(f for f in dataclasses.fields(Manifest) if f.name not in ("extra", "absent", "path"))
_MANIFEST_OPTIONAL: Final = frozenset(f.name for f in _MANIFEST_FIELDS) - {"schema"}


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest in ``folder``, or None when there is none or it is unreadable (treated as no record).

    A manifest that is there but malformed (edited by hand, damaged) is also no record: a warning names the file and
    the field, and ``run`` redoes the folder and writes a new one, instead of failing on a wrong type later.
    Readers that must not go on without one use :func:`load_manifest`.
    """
    path = folder / MANIFEST_NAME
    try:
        return load_manifest(path)
    except FileNotFoundError:
        return None
    except ManifestError as exc:
        problem = exc.message.removeprefix(f"{path}: ")
        get_logger("manifest").warning(f"ignoring {path}: {problem}; the folder is treated as having no record")
        return None


def load_manifest(path: Path) -> Manifest:
    """The manifest at ``path`` (a ``manifest.json`` or a published ``*.manifest.json``).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ManifestError: it is not readable JSON, or a field is malformed (the message names the file and the field).
    """

    # NaN and Infinity accepted: our own writer keeps a non-finite measurement (a speed of a run too quick to time).
    data = load_bounded_file(
        path, max_bytes=MAX_MANIFEST_BYTES, allow_nan=True, error=ManifestError, hint=_HINT, raise_missing=True
    )
    return Manifest.from_dict(data, path=path)


def _manifest_problem(data: object) -> str | None:
    """The first field of a manifest that readers would trip over, as ``field: why``; None when it is sound."""

    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    if data.get("schema") != SCHEMA or not _is_int(data.get("schema")):
        return f"schema: expected {SCHEMA}, found {show(data.get('schema'))}: not a cecai-converter manifest it reads"
    for key in ("source", "timings", "runtime", "base", "toolchain", "tool", "imatrix", "checks", "multimodal"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"{key}: expected an object"
    if data.get("source_parity") is not None:
        why = record_problem(data["source_parity"])
        if why is not None:
            return f"source_parity.{why}" if not why.startswith("expected") else f"source_parity: {why}"
    for key in ("pair", "inputs_key"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"{key}: expected a string"
    if data.get("fidelity_on") not in (None, "builder", "check"):
        return f"fidelity_on: expected builder, check or null, found {show(data['fidelity_on'])}"
    if data.get("trained") is not None and not isinstance(data["trained"], bool):
        return "trained: expected true or false"
    imatrix = data.get("imatrix") or {}
    if "file" in imatrix:  # reproduce copies the matrix under this name: never a path out of its folder
        why = check_plain_name(imatrix["file"])
        if why is not None:
            return f"imatrix.file: {why}"
    if data.get("model_name") is not None:  # names files next to the manifest: never a path
        try:
            check_stem(data["model_name"], "model_name")
        except UsageError as exc:
            return exc.message
    files = data.get("files", [])
    if not isinstance(files, list):
        return "files: expected a list"
    mmproj = data.get("mmproj")
    if mmproj is not None and not isinstance(mmproj, list):
        return "mmproj: expected a list"
    rows = [("files", i, e) for i, e in enumerate(files)] + [("mmproj", i, e) for i, e in enumerate(mmproj or [])]
    for where, i, entry in rows:  # projector files are listed as text files are, and checked alike
        if not isinstance(entry, dict):
            return f"{where}[{i}]: expected an object"
        why = check_plain_name(entry.get("name"))
        if why is not None:
            return f"{where}[{i}].name: {why}"
        for key, required, ok in _ENTRY_CHECKS:
            if required and not ok(entry.get(key)):
                return f"{where}[{i}].{key}: missing or of the wrong type"
            if not required and entry.get(key) is not None and not ok(entry[key]):
                return f"{where}[{i}].{key}: of the wrong type"
        why = _fidelity_problem(entry.get("fidelity"))
        if why is not None:
            return f"{where}[{i}].fidelity.{why}"
        if entry.get("quantization") is not None:
            why = quantization_problem(entry["quantization"])
            if why is not None:
                return f"{where}[{i}].quantization{': ' if why.startswith('expected') else '.'}{why}"
    for pair, record in (data.get("checks") or {}).items():
        problem = check_record_problem(record)
        if problem is not None:
            where, why = problem
            return f"checks.{pair}{'.' if where else ''}{where}: {why}"
    request = data.get("request")
    if request is not None:  # publish rewrites its file options: a request must be what convert writes
        if not isinstance(request, dict):
            return "request: expected an object"
        for key in ("values", "sources"):
            if request.get(key) is not None and not isinstance(request[key], dict):
                return f"request.{key}: expected an object"
        thresholds = (request.get("values") or {}).get("thresholds")
        if thresholds is not None and not isinstance(thresholds, dict):  # a check applies them: never drop them
            return "request.values.thresholds: expected an object"
    source = data.get("source") or {}
    if source.get("path") is not None and not isinstance(source["path"], str):
        return "source.path: expected a string"
    records = source.get("files", [])
    if not isinstance(records, list):
        return "source.files: expected a list"
    for i, record in enumerate(records):
        if not (
            isinstance(record, dict)
            and isinstance(record.get("path"), str)
            and isinstance(record.get("sha256"), str)
            and _is_int(record.get("bytes"))
            and (_is_int(record.get("mtime_ns")) or record.get("mtime_ns") is None)  # published: dropped
        ):
            return f"source.files[{i}]: expected an object with path, bytes, mtime_ns and sha256"
    return None


def write_manifest(folder: Path, data: Mapping[str, Any]) -> Manifest:
    """Write ``folder/manifest.json`` atomically and return it, as read back.

    ``data`` is checked like any manifest first: a writer's mistake fails here, not in the next reader.
    """
    path = folder / MANIFEST_NAME
    manifest = Manifest.from_dict(
        {"schema": SCHEMA, "tool": {"name": "cecai-converter", "version": __version__}, **data}, path=path
    )
    atomic_write_json(path, manifest.to_dict())
    return manifest


def inputs_key(**parts: Any) -> str:
    """A stable hash of everything a file's bytes depend on (source fingerprint, precision, toolchain, imatrix)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_is_current(entry: FileEntry, folder: Path, key: str) -> bool:
    """True when ``entry`` was made from ``key`` and its file is still there, unchanged in size and mtime."""
    if entry.inputs_key != key:
        return False
    try:
        st = (folder / entry.name).stat()
    except OSError:
        return False
    return st.st_size == entry.bytes and st.st_mtime_ns == entry.mtime_ns
