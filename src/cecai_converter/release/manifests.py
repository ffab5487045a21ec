"""The manifest as a release publishes it, and what its check records say about it.

:func:`release_manifest` drops what only meant something on the builder's machine (host paths, mtimes) and merges
one check record per pair (``cecai-convert check``); :func:`attach_checks` stages those manifests in place of the
builder's; :func:`record_problems` and :func:`check_failures` give the verdict that keeps a release a draft; and
:func:`stable_view` is what two runs must agree on to be the same release.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from ..errors import UsageError
from ..fsutil import atomic_write_text, sha256_file
from ..manifest import Manifest
from ..names import show
from ..option_table import without_host_paths
from ..records import CheckRecord, CheckRow
from .assets import LocalAsset

__all__ = [
    "VOLATILE_KEYS",
    "attach_checks",
    "check_failures",
    "fidelity_measured",
    "record_problems",
    "release_manifest",
    "stable_view",
]

#: Manifest keys whose values change from run to run without the files changing: a re-run that differs only here
#: publishes nothing new.
VOLATILE_KEYS: Final = frozenset(
    {"timings", "mtime_ns", "prompt_tps", "gen_tps", "peak_rss_mib", "reused", "tool", "verify_s", "fidelity_s"}
)


def stable_view(data: Any) -> Any:
    """``data`` without :data:`VOLATILE_KEYS` (at any depth): what two runs must agree on to be the same release."""
    if isinstance(data, dict):
        return {k: stable_view(v) for k, v in data.items() if k not in VOLATILE_KEYS}
    if isinstance(data, list):
        return [stable_view(v) for v in data]
    return data


def release_manifest(manifest: Manifest, checks: Sequence[CheckRecord | Mapping[str, Any]]) -> Manifest:
    """The manifest as published: no host paths, and one check record per pair (``checks: {pair: record}``) of
    ``checks`` only (any ``checks`` the manifest itself holds are dropped; none given: no ``checks`` key). A record
    given as its JSON object is typed first (:meth:`CheckRecord.of`).

    The builder's manifest records where the source was on its machine and when each file was written; neither
    means anything to a downloader, and both change between runs.
    """
    source = dict(manifest.source or {})
    if manifest.source_record.kind == "local":
        source.pop("path", None)
        source["files"] = [{k: v for k, v in f.items() if k != "mtime_ns"} for f in manifest.source_files]
    extra = dict(manifest.extra)
    if manifest.request is not None:
        extra["request"] = without_host_paths(manifest.request)
    published = dataclasses.replace(
        manifest,
        extra=extra,
        source=source,
        files=[e.without_host_facts() for e in manifest.files],
        mmproj=None if manifest.mmproj is None else [e.without_host_facts() for e in manifest.mmproj],
        absent=manifest.absent - {"source"},
        path=None,
    )
    # Exactly the records given: `checks` already in an input manifest are nobody's evidence (an edited file, or one
    # downloaded from an earlier release) and must not count towards publishing.
    records = sorted((CheckRecord.of(r) for r in checks), key=lambda r: str(r.pair))
    by_pair = {str(r.pair): r for r in records}
    absent = published.absent - {"checks"} if by_pair else published.absent | {"checks"}
    published = dataclasses.replace(
        published, checks={p: r.to_dict() for p, r in by_pair.items()} or None, absent=absent
    )
    if manifest.fidelity_on == "check":  # each file's fidelity as a check measured it, naming that runtime
        measured = next((r for r in by_pair.values() if fidelity_measured(r, published)), None)
        if measured is not None:
            rows = _rows_by_name(measured, first=False)
            by_device = str(measured.runtime_record.device)
            published = dataclasses.replace(published, files=[dataclasses.replace(e, fidelity={
                **_fidelity(rows[e.name]),
                "measured_by": {"pair": measured.pair, "device": _measured_on(rows[e.name], by_device)},
            }) for e in published.files])  # fmt: skip
    return published


def _rows_by_name(record: CheckRecord, *, first: bool) -> dict[str | None, CheckRow]:
    """A record's rows by file name; where a name repeats, its ``first`` row or its last."""
    rows: dict[str | None, CheckRow] = {}
    for row in record.rows:
        if not first or row.name not in rows:
            rows[row.name] = row
    return rows


def _fidelity(row: CheckRow) -> dict[str, Any]:
    """A row's fidelity record (an object wherever :func:`fidelity_measured` said so)."""
    return dict(row.fidelity or {})


def _measured_on(row: CheckRow, default: str) -> str:
    """The device a row's fidelity names (the check's runtime, ``cpu`` or ``cuda``); ``default`` where it names
    none."""
    record = row.fidelity_record
    return default if record is None or record.device is None else record.device


def fidelity_measured(record: CheckRecord | Mapping[str, Any], manifest: Manifest) -> bool:
    """Whether ``record`` (a check) measured the fidelity of every file of ``manifest``, on the same bytes
    (FIDELITY_ON=check: publish needs one such record per model)."""
    rows = _rows_by_name(CheckRecord.of(record), first=False)
    return bool(manifest.files) and all(
        (row := rows.get(e.name)) is not None and isinstance(row.fidelity, Mapping) and row.sha256 == e.sha256
        for e in manifest.files
    )


def attach_checks(
    assets: list[LocalAsset], records: Sequence[CheckRecord], staging: Path
) -> tuple[list[LocalAsset], dict[str, Manifest]]:
    """Replace each manifest asset by its release manifest (see :func:`release_manifest`) in ``staging``.

    Every manifest of a model (one per pair when each pair converted on its own) gets all of that model's records:
    a record is about files, and the files are the same.

    Returns the new asset list and the release manifests, keyed by model name (``model (asset name)`` where a model
    has several), so that every one is checked and shown.

    Raises:
        UsageError: a check record belongs to no manifest being published, or its files are not that manifest's.
    """
    by_model: dict[str, list[CheckRecord]] = {}
    for record in records:
        by_model.setdefault(str(record.model_name), []).append(record)
    per_model = Counter(str(a.manifest.model_name) for a in assets if a.manifest is not None)
    out: list[LocalAsset] = []
    published: dict[str, Manifest] = {}
    for asset in assets:
        if asset.manifest is None:
            out.append(asset)
            continue
        manifest = asset.manifest
        model = str(manifest.model_name)
        own = by_model.get(model, [])
        shas: dict[str | None, str] = {e.name: e.sha256 for e in manifest.files}
        for record in own:
            for row in record.rows:
                if shas.get(row.name) not in (None, row.sha256) and row.sha256_match:
                    raise UsageError(f"the {record.pair} check of {model} checked other bytes of {row.name}")
        data = release_manifest(manifest, own)
        staged = staging / asset.name
        atomic_write_text(staged, json.dumps(data.to_dict(), indent=2, sort_keys=True) + "\n")
        size, digest = staged.stat().st_size, sha256_file(staged)
        out.append(LocalAsset(asset.name, staged, size, digest, "manifest", manifest=data))
        published[model if per_model[model] == 1 else f"{model} ({asset.name})"] = data
    orphans = sorted(set(by_model) - set(per_model))
    if orphans:
        raise UsageError(
            f"check records for {', '.join(orphans)}, whose files are not being published",
            hint="pass the make artifact of every model whose check records you pass",
        )
    return out, published


def record_problems(record: CheckRecord, manifest: Manifest) -> list[str]:
    """Why a check record does not vouch for ``manifest``'s files; empty when it does.

    The verdict comes from the rows, never from the record's own top-level ``passed`` (a record is a file from an
    artifact: it may say ``passed: true`` over a failed row, or over no row at all). The record passes when it
    lists no problem of its own and every file of the manifest (projector files too) has a row that passed and
    checked the same bytes (sha256 equal to the manifest's).
    """
    pair = record.pair
    problems = [f"{pair}: {p}" for p in record.problems or []]
    rows = _rows_by_name(record, first=True)
    if not rows:
        problems.append(f"{pair}: the record checked no file")
    for entry in [*manifest.files, *(manifest.mmproj or [])]:  # a vision model's projector files are published too
        row = rows.get(entry.name)
        if row is None:
            problems.append(f"{pair}: {entry.name}: not checked (no row in the record)")
        elif row.sha256 != entry.sha256:
            problems.append(f"{pair}: {entry.name}: the check measured other bytes (sha256 {show(row.sha256)})")
        elif not row.vouches_for(entry.sha256):
            why = "; ".join(str(p) for p in row.problems or []) or "the row did not pass"
            problems.append(f"{pair}: {entry.name}: {why}")
    return problems


def check_failures(manifests: Mapping[str, Manifest], expected: Sequence[tuple[str, str]] | None) -> list[str]:
    """Why the release must stay a draft: failed checks, and expected (model, pair) checks with no record.

    ``manifests`` are the release manifests (see :func:`attach_checks`); a model's records count wherever they
    are, each failure is named once.
    """
    problems: list[str] = []
    for manifest in manifests.values():
        records = manifest.check_records
        for record in records.values():
            failed = record_problems(record, manifest)
            problem = f"{manifest.model_name}: {'; '.join(failed)}"
            if failed and problem not in problems:
                problems.append(problem)
        if manifest.fidelity_on == "check" and not any(fidelity_measured(r, manifest) for r in records.values()):
            problem = (
                f"{manifest.model_name}: fidelity-on is check, but no check record measured the files' fidelity "
                "(a GPU pair's check does with fidelity: auto; fidelity: true makes any check job measure it)"
            )
            if problem not in problems:
                problems.append(problem)
    for model, pair in expected or ():
        if not any(str(m.model_name) == model and pair in m.check_records for m in manifests.values()):
            problems.append(f"{model}: no check record from {pair} (its check job failed before writing one)")
    return problems
