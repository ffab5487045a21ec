"""Typed readings of a manifest's nested objects: a file's ``fidelity`` and ``verification``, the run's ``source``,
``imatrix``, ``multimodal``, ``base``, ``tool`` and ``toolchain``.

:class:`~cecai_converter.manifest.Manifest` and :class:`~cecai_converter.manifest.FileEntry` keep these objects as
the JSON that was written (``to_dict`` gives it back byte for byte, keys a newer version added included). Readers
(the card, ``report``, the job summary, ``reproduce``) ask for them through the ``*_record`` properties, which return
the frozen dataclasses below, so that no reader looks fields up by string.

A reading is lenient where the manifest check is (``manifest._manifest_problem`` already refused what would break a
writer's guarantees): a field that is absent, or of another type than declared, reads as None (or an empty tuple),
which the readers show as "not recorded". How each field is read follows from its declaration alone
(:func:`read_fields`), so a new field is one line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

__all__ = [
    "Base",
    "EvalText",
    "Fidelity",
    "FidelityBudget",
    "Imatrix",
    "LicenseFile",
    "ListedFile",
    "MeasuredBy",
    "Multimodal",
    "RequestValues",
    "Source",
    "SourceCard",
    "SourceFile",
    "Tool",
    "Toolchain",
    "Verification",
    "finite",
    "read_fields",
    "read_object",
]

_T = TypeVar("_T")


def finite(value: object) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _as_float(value: object) -> float | None:
    """A JSON number as a float, inf and NaN kept as written; None for anything else, and for a whole number too
    large for a float (a hand-edited manifest: shown as not recorded rather than stopping the reader)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _reader(hint: object) -> typing.Callable[[object], object]:
    """How a JSON value becomes a field declared ``hint`` (``X | None``, ``tuple[X, ...]``, a view class)."""
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint) or hint
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        one = _reader(item)

        def many(value: object) -> object:
            if not isinstance(value, list):
                return ()
            read = [one(v) for v in value]
            return tuple(v for v in read if v is not None)

        return many
    if origin is Mapping or origin is dict:
        return lambda value: value if isinstance(value, dict) else None
    if origin is bool:
        return lambda value: value if isinstance(value, bool) else None
    if origin is int:
        return lambda value: value if isinstance(value, int) and not isinstance(value, bool) else None
    if origin is float:
        # kept as written, inf and NaN included (a speed too quick to time): readers format them
        return _as_float
    if origin is str:
        return lambda value: value if isinstance(value, str) else None
    if isinstance(origin, type) and dataclasses.is_dataclass(origin):
        view = origin
        return lambda value: read_object(view, value)
    if origin is Literal:
        allowed = typing.get_args(hint)
        return lambda value: value if value in allowed else None
    raise TypeError(f"no reading declared for a field of type {hint!r}")


@functools.cache
def _readers(cls: type) -> tuple[tuple[str, typing.Callable[[object], object]], ...]:
    """Each field of ``cls`` with its reading, derived once per class (readers ask for records often)."""
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _reader(hints[f.name])) for f in dataclasses.fields(cls))


def read_fields(cls: type[_T], data: object) -> _T:
    """``cls`` (a dataclass whose fields are all optional) from a JSON object; see the module's docstring. Anything
    but an object reads as a record with nothing recorded."""
    values = data if isinstance(data, Mapping) else {}
    # (a class is hashable; mypy cannot tell it of a type variable's class)
    return cls(**{name: read(values.get(name)) for name, read in _readers(typing.cast(type, cls))})


def read_object(cls: type[_T], data: object) -> _T | None:
    """``cls`` from ``data`` when it is a JSON object, else None (the object was not recorded)."""
    return read_fields(cls, data) if isinstance(data, dict) else None


@dataclass(frozen=True)
class MeasuredBy:
    """``fidelity.measured_by`` of a published file: the check job that measured it."""

    pair: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class FidelityBudget:
    """``fidelity.budget``: how the error-bar budget was set and where it stopped (``fidelity.budget``)."""

    mode: str | None = None
    target: float | None = None
    kld_se_floor: float | None = None
    top1_se_max: float | None = None
    min_tokens: int | None = None
    min_chunks: int | None = None
    text_tokens: int | None = None
    stopped: str | None = None
    chunks: int | None = None
    kld_mean_se_chunks: float | None = None
    top1_agreement_se_chunks: float | None = None
    kld_rel_se: float | None = None


#: The error between chunks that widens each per-position error (``Fidelity.error``).
_BETWEEN_CHUNKS: Final = {"kld_mean_se": "kld_mean_se_chunks", "top1_agreement_se": "top1_agreement_se_chunks"}


@dataclass(frozen=True)
class Fidelity:
    """A file's ``fidelity``: KL-divergence, perplexity and top-1 against the base, and the speed they ran at."""

    kld_mean: float | None = None
    kld_mean_se: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_p99_9: float | None = None
    kld_max: float | None = None
    ppl: float | None = None
    ppl_base: float | None = None
    ppl_delta_pct: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_se: float | None = None
    top1_agreement: float | None = None
    top1_agreement_se: float | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    device: str | None = None
    n_tokens: int | None = None
    budget: FidelityBudget | None = None
    measured_by: MeasuredBy | None = None

    def error(self, key: Literal["kld_mean_se", "top1_agreement_se"]) -> float | None:
        """The standard error a reader should be shown for ``key``: llama-perplexity's per-position one or, when the
        budget recorded the error between the text's chunks and it is larger, that one (tokens of one chunk share
        their context). None when the record has no such error."""
        se = finite(getattr(self, key))
        wider = finite(getattr(self.budget, _BETWEEN_CHUNKS[key])) if self.budget is not None else None
        return max(se, wider) if se is not None and wider is not None else se

    @property
    def measured_on(self) -> str | None:
        """The device the numbers were measured on: the measuring check's, else the builder's."""
        by = self.measured_by.device if self.measured_by is not None else None
        return by or self.device


@dataclass(frozen=True)
class Verification:
    """A file's ``verification``: the load-and-generate check (``verify.generate_check``), and for a projector file
    the image check."""

    runtime: str | None = None
    n_vocab: int | None = None
    prompt: str | None = None
    generated_tokens: tuple[int, ...] = ()  # the token ids generated (verify.LoadCheck), not a count
    text: str | None = None
    image_tokens: int | None = None


@dataclass(frozen=True)
class LicenseFile:
    """One of ``source.card.license_files``: a license text the source ships."""

    name: str | None = None
    bytes: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class SourceCard:
    """``source.card``: what the source's model card and config say (``source_card.read_source_card``)."""

    base_model: tuple[str, ...] = ()
    base_model_relation: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    license_files: tuple[LicenseFile, ...] = ()
    architecture: str | None = None


@dataclass(frozen=True)
class SourceFile:
    """One of ``source.files``: a local source's file as it was fingerprinted (``source.fingerprint_files``)."""

    path: str | None = None
    bytes: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    """``source``: where the model came from (``kind`` ``local`` or ``hub``)."""

    kind: str | None = None
    fingerprint: str | None = None
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    card: SourceCard | None = None
    files: tuple[SourceFile, ...] = ()

    @property
    def is_hub(self) -> bool:
        """Whether the model came from the Hugging Face Hub."""
        return self.kind == "hub"


@dataclass(frozen=True)
class Imatrix:
    """``imatrix``: the importance matrix the low-bit files were quantized with."""

    source: str | None = None
    file: str | None = None
    sha256: str | None = None
    calibration_text: str | None = None
    calibration_text_sha256: str | None = None


@dataclass(frozen=True)
class Multimodal:
    """``multimodal``: the towers beyond the text model (``multimodal.plan_towers``)."""

    towers: tuple[str, ...] = ()
    projector: bool | None = None
    text_only: bool | None = None
    left_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class Base:
    """``base``: the base file's precision, and whether it was kept among the outputs; with FIDELITY_ON=check also
    the base GGUF shipped for the check jobs (``file``, ``sha256``)."""

    precision: str | None = None
    kept: bool | None = None
    file: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Tool:
    """``tool``: the writer's name and version."""

    name: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class Toolchain:
    """``toolchain``: the llama.cpp the files were made with (``toolchain.ToolchainInfo.as_manifest``)."""

    llama_cpp_python: str | None = None
    sdist_sha256: str | None = None


@dataclass(frozen=True)
class EvalText:
    """``eval_text``: the text fidelity was measured on, where a manifest names it (``name``, ``sha256``)."""

    name: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class RequestValues:
    """``request.values`` (``request.Request.record``): the options the run was asked for, as JSON; the fields a
    reader of the manifest needs (a check measuring fidelity as the builder asked)."""

    fidelity_target: float | None = None
    fidelity_tokens: str | None = None
    eval_text: str | None = None
    thresholds: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ListedFile:
    """One of ``files`` in ``convert --json``'s reply: a manifest's file entry (``FileEntry.to_dict``, ``role``
    ``mmproj`` for a projector file) with its ``path``; read leniently, as the job summary shows what it holds."""

    name: str | None = None
    precision: str | None = None
    role: str | None = None
    bytes: int | None = None
    sha256: str | None = None
