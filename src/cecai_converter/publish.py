"""``cecai-convert publish``: attach GGUF files, their manifests and ``SHA256SUMS`` to a GitHub release.

The rules GitHub imposes, and how this module keeps them:

* **Immutable releases** refuse new assets once published. Files go to a *draft* release (found or created for the
  tag), and the draft is published last. A release that is already published and immutable is only accepted when
  every file is already there, byte for byte (a re-run); anything new is refused with a clear message.
* **Each asset must stay below 2 GiB.** A GGUF file of :data:`SIZE_LIMIT` bytes or more is split in llama.cpp's
  split format (what ``llama-gguf-split --split`` writes: ``<name>-00001-of-0000N.gguf``, ``split.*`` keys), which
  llama.cpp and llama-cpp-python load directly from the first part. The release notes say so.
* **Re-runs never clobber.** An asset with the same name and the same SHA-256 is skipped; a *different* file under
  a name that is already taken is an error, found before anything is uploaded. Assets this tool did not write are
  never touched. ``SHA256SUMS`` is the one file it rewrites, merged with the lines already there.
* **Nothing half-published.** A failed upload deletes every asset this run uploaded and leaves the release as it was
  (a draft stays a draft). On a published, mutable release, new files are uploaded under temporary names and renamed
  only after all of them arrived.

A run is three steps: :func:`plan_release` (checks the inputs, stages parts, release manifests and ``SHA256SUMS``,
compares them with the release; reads from GitHub only, so every refusal comes before the first write),
:func:`upload_release` (creates the draft if needed, uploads, renames into place) and :func:`finalize_release`
(release notes, then publishing the draft unless a check failed).

The REST calls use ``urllib`` against ``GITHUB_API_URL`` (``https://api.github.com`` by default) with the token from
``GITHUB_TOKEN``; the token is sent only in the ``Authorization`` header to that API and its upload host, and is
never logged or put in a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .errors import ChecksFailed, ConverterError, GitHubAPIError, ManifestError, PublishFailed, UsageError
from .fsutil import atomic_write_text, refuse_symlink, sha256_file
from .manifest import MANIFEST_NAME, Manifest, load_manifest
from .markdown import code, inline
from .names import control_character, show
from .output import Output, decimal_size, get_logger
from .pairs import PAIRS
from .request import without_host_paths

__all__ = [
    "BODY_LIMIT",
    "CHECKSUMS_NAME",
    "SIZE_LIMIT",
    "GitHubClient",
    "LocalAsset",
    "PublishResult",
    "ReleasePlan",
    "check_asset_names",
    "collect_assets",
    "finalize_release",
    "parse_checksums",
    "plan_release",
    "publish_release",
    "push_to_hub",
    "record_problems",
    "register",
    "release_manifest",
    "release_notes",
    "split_gguf",
    "upload_release",
]

#: GitHub refuses release assets of 2 GiB or more; stay below 2,000,000,000 bytes (2 GB).
SIZE_LIMIT: Final = 2_000_000_000
CHECKSUMS_NAME: Final = "SHA256SUMS"
#: The suffix of an asset uploaded to a published release before it is renamed to its final name.
PARTIAL_SUFFIX: Final = ".cecai-partial"
NOTES_START: Final = "<!-- cecai-converter:assets -->"
NOTES_END: Final = "<!-- /cecai-converter:assets -->"
_SPLIT_NAME: Final = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
#: The longest release description GitHub accepts, in characters.
BODY_LIMIT: Final = 125_000
#: Asset names GitHub keeps as they are. It replaces every other character (a space, ``~``, ``:``, ``(``, non-ASCII
#: letters) with ``.`` and renames leading and trailing periods, silently: SHA256SUMS and the manifests would then
#: name files that are not on the release, and a re-run would not find them.
_ASSET_NAME: Final = re.compile(r"[A-Za-z0-9_+-](?:[A-Za-z0-9._+-]*[A-Za-z0-9_+-])?")
_ASSET_CHARS: Final = "ASCII letters, digits, '.', '_', '-' and '+', not starting or ending with '.'"
_log = get_logger("publish")


@dataclass(frozen=True)
class LocalAsset:
    """A file to attach.

    Attributes:
        name: the asset name on the release.
        path: where the bytes are.
        size: bytes.
        sha256: hex digest.
        kind: ``gguf``, ``split`` (one part of a split GGUF file), ``manifest``, ``checksums`` or
            ``tensor-types`` (the ``--tensor-type-file`` map of per-tensor overrides).
        precision: the GGUF file's precision, when a manifest says it.
        split_of: for a part, the name of the GGUF file it was split from.
        manifest: for a manifest asset, its content (read once, when collected).
    """

    name: str
    path: Path
    size: int
    sha256: str
    kind: str
    precision: str | None = None
    split_of: str | None = None
    manifest: Manifest | None = field(default=None, compare=False, repr=False)


@dataclass
class PublishResult:
    """What :func:`publish_release` did."""

    tag: str
    release_id: int
    html_url: str
    draft: bool
    created: bool
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    hub_commit_url: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return {
            "tag": self.tag,
            "release_id": self.release_id,
            "html_url": self.html_url,
            "draft": self.draft,
            "created": self.created,
            "uploaded": self.uploaded,
            "unchanged": self.unchanged,
            "replaced": self.replaced,
            "split": self.split,
            "hub_commit_url": self.hub_commit_url,
        }


# --------------------------------------------------------------------------------------------------- local files


def split_gguf(path: Path, outdir: Path, *, size_limit: int = SIZE_LIMIT) -> list[Path]:
    """Split a GGUF file into parts that are each smaller than ``size_limit`` bytes, the way ``gguf-split`` does.

    The first part keeps every key/value of the original; every part carries ``split.no`` (u16),
    ``split.count`` (u16) and ``split.tensors.count`` (i32), and its share of the tensors in the original order.
    Parts are named ``<stem>-00001-of-0000N.gguf``; llama.cpp loads the set from the first part.

    Raises:
        UsageError: the file is not GGUF, or one tensor (plus the header) cannot fit under the limit.
    """
    import gguf  # the reader/writer of the pinned llama.cpp

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path} is not a readable GGUF file: {exc}") from None
    alignment = int(reader.alignment)
    # Budget per part for tensor data: what is left after the original header (the first part carries all of it)
    # and the worst-case alignment padding of every tensor.
    header = int(reader.data_offset) + 256
    budget = size_limit - header - alignment * len(reader.tensors)
    biggest = max((int(t.n_bytes) for t in reader.tensors), default=0)
    if biggest > budget:
        raise UsageError(
            f"{path.name}: a tensor of {biggest} bytes cannot fit in a part below {size_limit} bytes",
            hint="GGUF files are split between tensors; a single tensor larger than the limit cannot be split",
        )
    outdir.mkdir(parents=True, exist_ok=True)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else "llama"
    writer = gguf.GGUFWriter(outdir / path.name, arch=arch, endianess=reader.endianess, split_max_size=budget)
    writer.data_alignment = alignment
    for fld in reader.fields.values():
        if fld.name == gguf.Keys.General.ARCHITECTURE or fld.name.startswith(("GGUF.", "split.")):
            continue
        vtype = fld.types[0]
        sub_type = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(fld.name, fld.contents(), vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    names = writer.format_shard_names(outdir / path.name)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    finally:
        writer.close()
    too_big = [p for p in names if p.stat().st_size >= size_limit]
    if too_big:
        raise UsageError(f"splitting {path.name} left a part of {too_big[0].stat().st_size} bytes (limit {size_limit})")
    return names


def _manifest_asset_name(manifest: Manifest, folder: Path) -> str:
    model = manifest.model_name or folder.name
    info = PAIRS.get(manifest.pair) if manifest.pair else None
    return f"{model}.{info.slug}.manifest.json" if info else f"{model}.manifest.json"


def _add(found: dict[str, LocalAsset], asset: LocalAsset) -> None:
    other = found.get(asset.name)
    if other is None:
        found[asset.name] = asset
    elif other.sha256 != asset.sha256:
        raise UsageError(
            f"two different files would be published as {asset.name!r}: {other.path} and {asset.path}",
            hint="the same model name was converted twice with different results; rename one (`name:` in the "
            "batch file) or publish them to different releases",
        )


_MANIFEST_HINT: Final = (
    "a manifest lists the files of its own folder by name, each with its sha256, as `cecai-convert` writes it; "
    "convert again instead of editing it"
)


def _load_for_publishing(manifest_path: Path) -> Manifest:
    """The manifest at ``manifest_path``, refused (before any request) when unreadable or malformed.

    Raises:
        ManifestError: naming the manifest and the field, and saying that nothing was published.
    """
    try:
        return load_manifest(manifest_path)
    except ManifestError as exc:
        raise ManifestError(f"{exc.message}; nothing was published", hint=_MANIFEST_HINT) from None


def _manifest_files(manifest: Manifest) -> list[tuple[Path, str, str | None]]:
    """The files a manifest lists, as ``(path, sha256, precision)``, each checked before anything is uploaded.

    A manifest is data from an artifact, not an instruction: every ``files[].name`` must be a plain file name of a
    regular file in the manifest's own folder (no path, no ``..``, no symbolic link, not hidden; the first two are
    refused by :meth:`Manifest.from_dict` already), and every file must carry a ``sha256`` that its bytes match.
    Otherwise a manifest could publish any file of the machine (an absolute name, ``../../.ssh/id_rsa``), or a file
    nobody checked.

    Raises:
        UsageError: naming the manifest, the entry and why.
    """
    assert manifest.path is not None  # read from disk by collect_assets
    manifest_path = manifest.path

    def refuse(where: str, why: str) -> UsageError:
        return UsageError(f"{manifest_path}: {where}: {why}; nothing was published", hint=_MANIFEST_HINT)

    folder = manifest_path.parent.resolve()
    out: list[tuple[Path, str, str | None]] = []
    # The projector files of a vision model (``mmproj``) are published next to the text files, checked alike.
    rows = [("files", i, e) for i, e in enumerate(manifest.files)]
    rows += [("mmproj", i, e) for i, e in enumerate(manifest.mmproj or [])]
    for key, index, entry in rows:
        name = entry.name
        if name.startswith("."):
            raise refuse(f"{key}[{index}].name", f"{show(name)} is a hidden file; conversions never write one")
        path = folder / name
        where = f"{key}[{index}] ({name})"
        refuse_symlink(
            path,
            where=f"{manifest_path}: {where}: ",
            why="only regular files in the manifest's folder are published; nothing was published",
            hint=_MANIFEST_HINT,
        )
        if not path.is_file():
            raise refuse(where, f"the file is not in {folder}")
        if not _SHA256_HEX.fullmatch(entry.sha256):
            raise refuse(f"{where}.sha256", f"not a SHA-256 (64 lowercase hex digits): {show(entry.sha256)}")
        if control_character(entry.precision):
            raise refuse(f"{where}.precision", f"expected a precision name, found {show(entry.precision)}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise UsageError(
                f"{path} does not match its manifest {manifest_path} "
                f"(sha256 {digest[:12]}…, manifest {entry.sha256[:12]}…); nothing was published",
                hint="the file changed or was damaged in transfer; convert it again",
            )
        out.append((path, digest, entry.precision if key == "files" else f"mmproj {entry.precision}"))
    return out


def collect_assets(inputs: Sequence[Path]) -> list[LocalAsset]:
    """What to publish from conversion output folders (each with a ``manifest.json``) and loose ``.gguf`` files.

    A folder contributes the GGUF files its manifest lists (checked against the manifest's SHA-256) and the manifest
    itself, named ``<model>.<pair slug>.manifest.json``. The same file reached twice (the GGUF bytes do not depend
    on the pair) is kept once.

    Raises:
        UsageError: a path is missing, a folder has no manifest, a manifest is malformed (:class:`ManifestError`),
            a file does not match its manifest, or two different files would get the same name.
    """
    found: dict[str, LocalAsset] = {}
    if not inputs:
        raise UsageError(
            "nothing to publish", hint="pass conversion output folders (with manifest.json) or .gguf files"
        )
    for item in inputs:
        if item.suffix == ".gguf":
            refuse_symlink(item)
        if item.is_file() and item.suffix == ".gguf":
            _add(found, LocalAsset(item.name, item, item.stat().st_size, sha256_file(item), "gguf"))
            continue
        manifest_path = item / MANIFEST_NAME if item.is_dir() else item
        if not manifest_path.is_file():
            raise UsageError(
                f"{item}: not a conversion output folder (no manifest.json) or a .gguf file",
                hint="pass the --outdir of `cecai-convert convert`, or the folder a workflow artifact "
                "was downloaded to (one per conversion)",
            )
        manifest = _load_for_publishing(manifest_path)
        for path, digest, precision in _manifest_files(manifest):
            _add(found, LocalAsset(path.name, path, path.stat().st_size, digest, "gguf", precision=precision))
        name = _manifest_asset_name(manifest, manifest_path.parent)
        size, digest = manifest_path.stat().st_size, sha256_file(manifest_path)
        _add(found, LocalAsset(name, manifest_path, size, digest, "manifest", manifest=manifest))
        overrides = _tensor_types_asset(manifest, manifest_path.parent)
        if overrides is not None:
            _add(found, overrides)
    return sorted(found.values(), key=lambda a: (a.kind != "gguf", a.name))


def _tensor_types_asset(manifest: Manifest, folder: Path) -> LocalAsset | None:
    """The ``<model>.tensor-types.txt`` map (llama-quantize ``--tensor-type-file``) of a conversion that used
    per-tensor overrides, checked against the overrides its manifest records; None without overrides.

    Raises:
        UsageError: the map is missing or does not hold the recorded overrides.
    """
    from .card import tensor_types_name
    from .quant_types import recorded_tensor_types, tensor_type_file

    rules = recorded_tensor_types(manifest.to_dict())
    if not rules:
        return None
    path = folder / tensor_types_name(str(manifest.model_name))
    refuse_symlink(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    if text != tensor_type_file(rules):
        raise UsageError(
            f"{path}: the files were quantized with per-tensor overrides ({' '.join(rules)}), but this map "
            f"{'is missing' if text is None else 'holds other overrides'}; nothing was published",
            hint="publish the whole output folder of `cecai-convert convert` (it writes the map), or convert again",
        )
    return LocalAsset(path.name, path, path.stat().st_size, sha256_file(path), "tensor-types")


def check_asset_names(assets: Iterable[LocalAsset]) -> None:
    """Refuse asset names GitHub would rewrite (see :data:`_ASSET_NAME`), before the first request.

    Raises:
        UsageError: naming the file, the name and the characters GitHub keeps.
    """
    for asset in assets:
        if not _ASSET_NAME.fullmatch(asset.name):
            raise UsageError(
                f"{asset.path}: GitHub would rename the release asset {show(asset.name)} (it replaces characters "
                f"other than {_ASSET_CHARS} with '.'), so SHA256SUMS and the manifests would name a file that is not "
                "on the release; nothing was published",
                hint=f"rename the file (and convert again, so its manifest names it) using only {_ASSET_CHARS}",
            )


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


def release_manifest(manifest: Manifest, checks: Sequence[Mapping[str, Any]]) -> Manifest:
    """The manifest as published: no host paths, and one check record per pair (``checks: {pair: record}``) of
    ``checks`` only (any ``checks`` the manifest itself holds are dropped; none given: no ``checks`` key).

    The builder's manifest records where the source was on its machine and when each file was written; neither
    means anything to a downloader, and both change between runs.
    """
    source = dict(manifest.source or {})
    if source.get("kind") == "local":
        source.pop("path", None)
        source["files"] = [{k: v for k, v in f.items() if k != "mtime_ns"} for f in source.get("files") or []]
    extra = dict(manifest.extra)
    if isinstance(extra.get("request"), dict):
        extra["request"] = without_host_paths(extra["request"])
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
    by_pair = {str(r["pair"]): dict(r) for r in sorted(checks, key=lambda r: str(r["pair"]))}
    absent = published.absent - {"checks"} if by_pair else published.absent | {"checks"}
    published = dataclasses.replace(published, checks=by_pair or None, absent=absent)
    if manifest.fidelity_on == "check":  # each file's fidelity as a check measured it, naming that runtime
        measured = next((r for r in by_pair.values() if fidelity_measured(r, published)), None)
        if measured is not None:
            rows = {row.get("name"): row for row in measured.get("files") or [] if isinstance(row, Mapping)}
            by_device = str((measured.get("runtime") or {}).get("device"))
            published = dataclasses.replace(published, files=[dataclasses.replace(e, fidelity={
                **rows[e.name]["fidelity"],
                "measured_by": {"pair": measured["pair"], "device": rows[e.name]["fidelity"].get("device", by_device)},
            }) for e in published.files])  # fmt: skip
    return published


def fidelity_measured(record: Mapping[str, Any], manifest: Manifest) -> bool:
    """Whether ``record`` (a check) measured the fidelity of every file of ``manifest``, on the same bytes
    (FIDELITY_ON=check: publish needs one such record per model)."""
    rows = {row.get("name"): row for row in record.get("files") or [] if isinstance(row, Mapping)}
    return bool(manifest.files) and all(
        isinstance((row := rows.get(e.name) or {}).get("fidelity"), Mapping) and row.get("sha256") == e.sha256
        for e in manifest.files
    )


def _attach_checks(
    assets: list[LocalAsset], records: Sequence[Mapping[str, Any]], staging: Path
) -> tuple[list[LocalAsset], dict[str, Manifest]]:
    """Replace each manifest asset by its release manifest (see :func:`release_manifest`) in ``staging``.

    Every manifest of a model (one per pair when each pair converted on its own) gets all of that model's records:
    a record is about files, and the files are the same.

    Returns the new asset list and the release manifests, keyed by model name (``model (asset name)`` where a model
    has several), so that every one is checked and shown.

    Raises:
        UsageError: a check record belongs to no manifest being published, or its files are not that manifest's.
    """
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_model.setdefault(str(record.get("model_name")), []).append(record)
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
        shas = {e.name: e.sha256 for e in manifest.files}
        for record in own:
            for row in record.get("files") or []:
                if shas.get(row.get("name")) not in (None, row.get("sha256")) and row.get("sha256_match"):
                    raise UsageError(f"the {record['pair']} check of {model} checked other bytes of {row['name']}")
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


def _row_passed(row: Mapping[str, Any], sha256: str | None) -> bool:
    """A record's row passes when it says so, lists no problem, and checked the bytes the manifest names."""
    return row.get("passed") is True and not row.get("problems") and sha256 is not None and row.get("sha256") == sha256


def record_problems(record: Mapping[str, Any], manifest: Manifest) -> list[str]:
    """Why a check record does not vouch for ``manifest``'s files; empty when it does.

    The verdict comes from the rows, never from the record's own top-level ``passed`` (a record is a file from an
    artifact: it may say ``passed: true`` over a failed row, or over no row at all). The record passes when it
    lists no problem of its own and every file of the manifest (projector files too) has a row that passed and
    checked the same bytes (sha256 equal to the manifest's).
    """
    pair = record.get("pair")
    problems = [f"{pair}: {p}" for p in record.get("problems") or []]
    rows: dict[Any, Mapping[str, Any]] = {}
    for row in record.get("files") or []:
        if isinstance(row, Mapping):
            rows.setdefault(row.get("name"), row)
    if not rows:
        problems.append(f"{pair}: the record checked no file")
    for entry in [*manifest.files, *(manifest.mmproj or [])]:  # a vision model's projector files are published too
        row = rows.get(entry.name)
        if row is None:
            problems.append(f"{pair}: {entry.name}: not checked (no row in the record)")
        elif row.get("sha256") != entry.sha256:
            problems.append(f"{pair}: {entry.name}: the check measured other bytes (sha256 {show(row.get('sha256'))})")
        elif not _row_passed(row, entry.sha256):
            why = "; ".join(str(p) for p in row.get("problems") or []) or "the row did not pass"
            problems.append(f"{pair}: {entry.name}: {why}")
    return problems


def check_failures(manifests: Mapping[str, Manifest], expected: Sequence[tuple[str, str]] | None) -> list[str]:
    """Why the release must stay a draft: failed checks, and expected (model, pair) checks with no record.

    ``manifests`` are the release manifests (see :func:`_attach_checks`); a model's records count wherever they
    are, each failure is named once.
    """
    problems: list[str] = []
    for manifest in manifests.values():
        for record in (manifest.checks or {}).values():
            failed = record_problems(record, manifest)
            problem = f"{manifest.model_name}: {'; '.join(failed)}"
            if failed and problem not in problems:
                problems.append(problem)
        if manifest.fidelity_on == "check" and not any(
            fidelity_measured(r, manifest) for r in (manifest.checks or {}).values()
        ):
            problem = (
                f"{manifest.model_name}: fidelity-on is check, but no check record measured the files' fidelity "
                "(a GPU pair's check does with fidelity: auto; fidelity: true makes any check job measure it)"
            )
            if problem not in problems:
                problems.append(problem)
    for model, pair in expected or ():
        if not any(str(m.model_name) == model and pair in (m.checks or {}) for m in manifests.values()):
            problems.append(f"{model}: no check record from {pair} (its check job failed before writing one)")
    return problems


def _split_large(
    assets: Iterable[LocalAsset], staging: Path, size_limit: int
) -> tuple[list[LocalAsset], dict[str, list[str]]]:
    out: list[LocalAsset] = []
    split: dict[str, list[str]] = {}
    for asset in assets:
        if asset.kind != "gguf" or asset.size < size_limit:
            out.append(asset)
            continue
        _log.info(f"splitting {asset.name} ({asset.size} bytes) into parts below {size_limit} bytes")
        parts = split_gguf(asset.path, staging / asset.name.removesuffix(".gguf"), size_limit=size_limit)
        split[asset.name] = [p.name for p in parts]
        for part in parts:
            out.append(
                LocalAsset(
                    part.name,
                    part,
                    part.stat().st_size,
                    sha256_file(part),
                    "split",
                    precision=asset.precision,
                    split_of=asset.name,
                )
            )
    return out, split


def parse_checksums(text: str) -> dict[str, str]:
    """``sha256sum`` output (``<hex>  <name>`` or ``<hex> *<name>``) as ``{name: hex}``."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def checksums_text(sums: Mapping[str, str]) -> str:
    """``SHA256SUMS`` content, sorted by name; ``sha256sum -c SHA256SUMS`` checks it."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def _check_cell(row: Mapping[str, Any] | None, sha256: str) -> str:
    if row is None:
        return "–"
    agr = row.get("agreement") or {}
    if not isinstance(agr, Mapping):
        agr = {}
    if not _row_passed(row, sha256):
        problems = [str(p) for p in row.get("problems") or []]
        if row.get("sha256") != sha256:
            problems.insert(0, "checked other bytes")
        return "❌ " + inline("; ".join(problems or ["failed"]), limit=120)
    speed = f"{agr['gen_tps']:.0f} tok/s" if isinstance(agr.get("gen_tps"), (int, float)) else ""
    kld = f"KLD {agr['kld_mean']:.1e}" if isinstance(agr.get("kld_mean"), (int, float)) else ""
    top1 = f"top-1 {agr['top1_agreement']:.0%}" if isinstance(agr.get("top1_agreement"), (int, float)) else ""
    return "✅ " + " · ".join(x for x in (speed, kld, top1) if x)


def checks_table(manifests: Mapping[str, Manifest]) -> list[str]:
    """Markdown lines: per model, a files × pairs table of the check results (runtime, speed, agreement)."""
    lines: list[str] = []
    for model, manifest in sorted(manifests.items()):
        checks = manifest.checks or {}
        if not checks:
            continue
        pairs = [p for p in PAIRS if p in checks]
        runtime = {p: checks[p].get("runtime") or {} for p in pairs}
        runtimes = ", ".join(
            f"{p}: {inline(runtime[p].get('device'))} on {inline(runtime[p].get('machine'))}" for p in pairs
        )
        lines += [f"#### Checked on each pair's runtime: {inline(model)}", "", f"Runtimes: {runtimes}.", ""]
        lines += ["| File | " + " | ".join(pairs) + " |", "| --- |" + " --- |" * len(pairs)]
        for entry in manifest.files:
            cells = []
            for pair in pairs:
                rows = {r.get("name"): r for r in checks[pair].get("files") or []}
                cells.append(_check_cell(rows.get(entry.name), entry.sha256))
            lines.append(f"| {code(entry.name, cell=True)} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "KLD and top-1: agreement of the pair's runtime with the builder's on the same file (0 and 100% = "
            "identical predictions); tok/s: generation speed on the pair's runner.",
            "",
        ]
    return lines


def release_notes(
    existing: str | None,
    rows: Sequence[tuple[str, int, str, str]],
    split: Mapping[str, Sequence[str]],
    manifests: Mapping[str, Manifest] | None = None,
    *,
    compact: bool = False,
) -> str:
    """The release body: the user's text kept, this tool's section (between markers) replaced.

    Every value from a manifest or check record goes through the one Markdown escaper (``markdown``).

    Args:
        existing: the current body.
        rows: (asset name, size, sha256, precision) for every GGUF asset and part on the release.
        split: original file name -> part names, for files that were split.
        manifests: model name → release manifest, for the table of per-pair checks.
        compact: one row per model instead of the per-file tables (see :func:`fit_notes`); each model's
            ``*.manifest.json`` and ``SHA256SUMS`` hold the full record.
    """
    lines = [NOTES_START, "### GGUF files", ""]
    if compact:
        lines += _compact_tables(rows, manifests or {})
    else:
        lines += ["| File | Precision | Size | SHA-256 |", "| --- | --- | ---: | --- |"]
        lines += [
            f"| {code(name, cell=True)} | {inline(precision or '')} | {decimal_size(size)} "
            f"| {code(digest[:16], cell=True)} |"
            for name, size, digest, precision in rows
        ]
    if manifests and not compact:
        from .card import files_table

        for model, manifest in sorted(manifests.items()):
            lines += ["", f"#### Files and fidelity: {inline(model)}", "", *files_table(manifest.to_dict(), {})]
        lines += ["", *checks_table(manifests)]
    lines += [
        "",
        f"Verify downloads with `sha256sum -c {CHECKSUMS_NAME}`. Each `*.manifest.json` records how a file "
        "was made (source revision, toolchain, verification).",
    ]
    if split:
        lines += [
            "",
            "**Split files.** GitHub limits a release asset to 2 GiB, so files of 2 GB or more are split in "
            "llama.cpp's split format (`gguf-split`): download every part into one folder and load the first "
            "(`…-00001-of-000NN.gguf`); llama.cpp and llama-cpp-python read the rest themselves. "
            "To merge them into one file: `llama-gguf-split --merge FIRST-PART OUT.gguf`.",
            "",
        ]
        if not compact:
            lines += [f"- {code(orig)} → {', '.join(code(p) for p in parts)}" for orig, parts in split.items()]
    lines.append(NOTES_END)
    section = "\n".join(lines)
    body = existing or ""
    start, end = body.find(NOTES_START), body.find(NOTES_END)
    if start != -1 and end > start:
        return body[:start] + section + body[end + len(NOTES_END) :]
    return f"{body.rstrip()}\n\n{section}\n" if body.strip() else section + "\n"


def _compact_tables(rows: Sequence[tuple[str, int, str, str]], manifests: Mapping[str, Manifest]) -> list[str]:
    """One row per model (files, total size, each pair's verdict) for a release too large for the full tables."""
    lines = [
        f"The per-file tables would pass GitHub's limit on a release description ({BODY_LIMIT:,} characters), so "
        "this is one row per model: each model's `*.manifest.json` holds every file with its size, SHA-256, "
        f"fidelity and check results, and `{CHECKSUMS_NAME}` lists every file.",
        "",
        "| Model | Files | Size | Checks |",
        "| --- | ---: | ---: | --- |",
    ]
    sizes = {name: size for name, size, _, _ in rows}
    claimed: set[str] = set()
    for model, manifest in sorted(manifests.items()):
        names = {e.name for e in manifest.files}
        mine = [n for n in sizes if _original_name(n) in names]
        claimed.update(mine)
        verdicts = [
            f"{inline(pair)} {'❌' if record_problems(record, manifest) else '✅'}"
            for pair, record in sorted((manifest.checks or {}).items())
        ]
        total = decimal_size(sum(sizes[n] for n in mine))
        lines.append(f"| {inline(model)} | {len(manifest.files)} | {total} | {', '.join(verdicts) or '–'} |")
    others = [n for n in sizes if n not in claimed]
    if others:
        lines.append(f"| other files | {len(others)} | {decimal_size(sum(sizes[n] for n in others))} | – |")
    return lines


def _original_name(name: str) -> str:
    """The GGUF file a split part was cut from (the name itself for any other file)."""
    m = _SPLIT_NAME.match(name)
    return f"{m['stem']}.gguf" if m else name


def body_length(body: str) -> int:
    """A release description's length as GitHub may count it: characters, or UTF-16 units where that is more."""
    return max(len(body), len(body.encode("utf-16-le")) // 2)


def fit_notes(
    existing: str | None,
    rows: Sequence[tuple[str, int, str, str]],
    split: Mapping[str, Sequence[str]],
    manifests: Mapping[str, Manifest] | None,
    *,
    tag: str,
    state: str = "nothing was uploaded",
) -> str:
    """The release notes (:func:`release_notes`) within :data:`BODY_LIMIT`: the full tables when they fit, else one
    row per model (``compact``).

    Raises:
        PublishFailed: not even the short notes fit (the release's own text is too long, or there are too many
            models); ``state`` says what was done by then (:func:`plan_release` calls this before the first upload).
    """
    body = release_notes(existing, rows, split, manifests)
    if body_length(body) <= BODY_LIMIT:
        return body
    body = release_notes(existing, rows, split, manifests, compact=True)
    if body_length(body) <= BODY_LIMIT:
        return body
    raise PublishFailed(
        f"the notes of release {tag} would be {body_length(body):,} characters even with one row per model, more "
        f"than GitHub accepts for a release description ({BODY_LIMIT:,}); {state}",
        hint="shorten the release's own text on its page, or publish fewer models to this tag",
    )


# ------------------------------------------------------------------------------------------------------ REST API


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by hand, without the Authorization header (asset downloads go to another host)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_HINTS: Final[Mapping[int, str]] = {
    401: "the token was refused: pass `github-token` (default: the workflow's GITHUB_TOKEN) or set GITHUB_TOKEN",
    403: "the token may not write releases: give the job `permissions: contents: write`",
    404: "check the repository name and that the token can see it (GITHUB_REPOSITORY, --repo)",
}


def _json_object(value: object) -> dict[str, Any]:
    """A REST answer that must be a JSON object (a release, an asset)."""
    if not isinstance(value, dict):
        raise GitHubAPIError(f"GitHub answered with {type(value).__name__}, not a JSON object", status=0)
    return value


def _refusal(method: str, url: str, exc: urllib.error.HTTPError) -> GitHubAPIError:
    """An error status as a :class:`GitHubAPIError`: the call (path only), GitHub's own message and a hint."""
    from .untrusted_json import loads_bounded

    raw = exc.read() or b""
    try:
        detail = str(loads_bounded(raw, what="GitHub's error", allow_nan=True).get("message", ""))[:500]
    except (ConverterError, AttributeError):
        detail = raw[:200].decode(errors="replace")
    path = urllib.parse.urlsplit(url).path
    return GitHubAPIError(
        f"GitHub refused {method} {path}: HTTP {exc.code} {detail}".rstrip(), status=exc.code, hint=_HINTS.get(exc.code)
    )


class GitHubClient:
    """The part of GitHub's REST API that publishing needs.

    Args:
        repo: ``owner/name``.
        token: a token with ``contents: write``; sent only in the ``Authorization`` header.
        api_url: the REST base URL (``GITHUB_API_URL``; ``https://api.github.com`` on github.com).
        timeout: seconds to wait on a socket.
    """

    def __init__(self, repo: str, token: str, *, api_url: str | None = None, timeout: float = 600.0) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", repo or ""):
            raise UsageError(f"not a repository name: {repo!r}", hint="write it as owner/name")
        if not token:
            raise UsageError(
                "GITHUB_TOKEN is not set",
                hint="in a workflow, pass `env: GITHUB_TOKEN: ${{ github.token }}` and `permissions: contents: write`",
            )
        self.repo = repo
        self._token = token
        self.api_url = (api_url or os.environ.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirect())

    def __repr__(self) -> str:  # keeps the token out of tracebacks and logs
        return f"GitHubClient(repo={self.repo!r}, api_url={self.api_url!r})"

    def _headers(self, accept: str = "application/vnd.github+json") -> dict[str, str]:
        return {
            "Accept": accept,
            "Authorization": f"Bearer {self._token}",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "cecai-converter",
        }

    def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        accept: str = "application/vnd.github+json",
    ) -> tuple[int, Any, Mapping[str, str]]:
        """One call; returns (status, parsed JSON or raw bytes, headers). Error statuses raise GitHubAPIError."""
        if not url.startswith(("http://", "https://")):
            url = f"{self.api_url}{url}"
        all_headers = self._headers(accept)
        if json_body is not None:
            data = json.dumps(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        req = urllib.request.Request(url, data=data, method=method, headers=all_headers)  # noqa: S310 (http(s) only)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                status, raw, resp_headers = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308):
                return exc.code, b"", dict(exc.headers)
            raise _refusal(method, url, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise GitHubAPIError(
                f"cannot reach {urllib.parse.urlsplit(url).netloc}: {reason}",
                status=0,
                hint="check the network and GITHUB_API_URL",
            ) from None
        if "json" in resp_headers.get("Content-Type", "") and raw:
            from .untrusted_json import loads_bounded

            what = f"GitHub's answer to {method} {urllib.parse.urlsplit(url).path}"
            try:  # another machine's JSON: bounded (a deep one would end in a RecursionError traceback)
                return status, loads_bounded(raw, what=what, allow_nan=True, max_bytes=256 * 1024 * 1024), resp_headers
            except UsageError as exc:
                raise GitHubAPIError(exc.message, status=status, hint="GitHub's API answered with bad JSON") from None
        return status, raw, resp_headers

    def _paged(self, path: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for page in range(1, 101):
            sep = "&" if "?" in path else "?"
            _, batch, _ = self.request("GET", f"{path}{sep}per_page=100&page={page}")
            items.extend(batch or [])
            if len(batch or []) < 100:
                break
        return items

    def find_release(self, tag: str) -> dict[str, Any] | None:
        """The release for ``tag``: a published one (by tag), else the newest draft with that tag, else None."""
        quoted = urllib.parse.quote(tag, safe="")
        try:
            _, release, _ = self.request("GET", f"/repos/{self.repo}/releases/tags/{quoted}")
            return _json_object(release)
        except GitHubAPIError as exc:
            if exc.status != 404:
                raise
        drafts = [r for r in self._paged(f"/repos/{self.repo}/releases") if r.get("tag_name") == tag]
        if len(drafts) > 1:
            _log.warning(f"warning: {len(drafts)} draft releases use tag {tag}; using release {drafts[0]['id']}")
        return drafts[0] if drafts else None

    def create_release(self, tag: str, *, body: str, target_commitish: str | None = None) -> dict[str, Any]:
        """A new draft release for ``tag``."""
        payload: dict[str, Any] = {"tag_name": tag, "name": tag, "body": body, "draft": True}
        if target_commitish:
            payload["target_commitish"] = target_commitish
        _, release, _ = self.request("POST", f"/repos/{self.repo}/releases", json_body=payload)
        return _json_object(release)

    def update_release(self, release_id: int, **fields: Any) -> dict[str, Any]:
        """PATCH a release (``body``, ``draft``...)."""
        _, release, _ = self.request("PATCH", f"/repos/{self.repo}/releases/{release_id}", json_body=fields)
        return _json_object(release)

    def list_assets(self, release_id: int) -> list[dict[str, Any]]:
        """Every asset of a release."""
        return self._paged(f"/repos/{self.repo}/releases/{release_id}/assets")

    def upload_asset(self, release: Mapping[str, Any], path: Path, name: str) -> dict[str, Any]:
        """Stream ``path`` to the release's upload URL as ``name``."""
        base = str(release["upload_url"]).split("{", 1)[0]
        url = f"{base}?{urllib.parse.urlencode({'name': name})}"
        size = path.stat().st_size
        with path.open("rb") as fh:
            _, asset, _ = self.request(
                "POST",
                url,
                data=fh,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
        return _json_object(asset)

    def delete_asset(self, asset_id: int) -> None:
        """Remove an asset."""
        self.request("DELETE", f"/repos/{self.repo}/releases/assets/{asset_id}")

    def rename_asset(self, asset_id: int, name: str) -> dict[str, Any]:
        """Give an asset its final name."""
        _, asset, _ = self.request("PATCH", f"/repos/{self.repo}/releases/assets/{asset_id}", json_body={"name": name})
        return _json_object(asset)

    def download_asset(self, asset_id: int) -> bytes:
        """An asset's bytes. GitHub answers with a redirect to storage, which is fetched without the token."""
        status, body, headers = self.request(
            "GET", f"/repos/{self.repo}/releases/assets/{asset_id}", accept="application/octet-stream"
        )
        if status in (301, 302, 303, 307, 308):
            location = headers.get("Location") or headers.get("location") or ""
            if not location.startswith(("http://", "https://")):
                raise GitHubAPIError(f"asset {asset_id}: redirect without a usable location", status=status)
            req = urllib.request.Request(location, headers={"User-Agent": "cecai-converter"})  # noqa: S310
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http(s) checked)
                    return bytes(resp.read())
            except (urllib.error.URLError, OSError) as exc:
                raise GitHubAPIError(f"cannot download asset {asset_id}: {exc}", status=0) from None
        return bytes(body)


# -------------------------------------------------------------------------------------------------- the publisher


def _identical(remote: Mapping[str, Any], asset: LocalAsset, remote_sums: Mapping[str, str]) -> bool | None:
    """True/False when known; None when GitHub gives no digest and SHA256SUMS does not list the file."""
    if int(remote.get("size", -1)) != asset.size:
        return False
    digest = remote.get("digest")
    if isinstance(digest, str) and digest.startswith("sha256:"):
        return digest.removeprefix("sha256:").lower() == asset.sha256
    known = remote_sums.get(asset.name)
    return None if known is None else known == asset.sha256


@dataclass
class ReleasePlan:
    """What a publish run will do, worked out from the local files and the release as it is, before any write.

    Attributes:
        tag: the release's tag.
        release: the release found for the tag; None when a draft is to be created.
        existing: the release's assets by name.
        assets: every asset this run publishes (parts instead of split files, release manifests, SHA256SUMS).
        to_upload: the assets that are new or replace one of ours.
        unchanged: names already there with the same content.
        replaced: manifests whose check records changed (uploaded again).
        stale: leftovers of an interrupted upload, removed before uploading.
        sums: SHA256SUMS as it will be (name → hex digest).
        split: original file name → part names, for files split this run.
        manifests: model name (``model (asset name)`` where a model has several) → release manifest (with its
            ``checks``).
        failures: why the release must stay a draft (failed or missing checks).
    """

    tag: str
    release: dict[str, Any] | None
    existing: dict[str, dict[str, Any]]
    assets: list[LocalAsset]
    to_upload: list[LocalAsset] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    stale: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, str] = field(default_factory=dict)
    split: dict[str, list[str]] = field(default_factory=dict)
    manifests: dict[str, Manifest] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def draft(self) -> bool:
        """Whether the release is (or will be created as) a draft."""
        return self.release is None or bool(self.release.get("draft"))


def plan_release(
    gh: GitHubClient,
    inputs: Sequence[Path],
    *,
    tag: str,
    staging: Path,
    size_limit: int = SIZE_LIMIT,
    checks: Sequence[Path] = (),
    expected_checks: Sequence[tuple[str, str]] | None = None,
    say: Callable[[str], None] = _log.info,
) -> ReleasePlan:
    """Check the inputs, stage what will be uploaded (parts, release manifests, SHA256SUMS) in ``staging``, and
    compare it with the release for ``tag``. Only reads from GitHub.

    Raises:
        UsageError: bad inputs (see :func:`collect_assets`), refused before the first request.
        PublishFailed: a name is taken by a different file, or the release is published, immutable and something
            is new.
    """
    from .check import read_records

    files = collect_assets(inputs)
    check_asset_names(files)
    records = read_records(list(checks)) if checks else []
    files, manifests = _attach_checks(files, records, staging)
    assets, split = _split_large(files, staging, size_limit)
    check_asset_names(assets)
    release = gh.find_release(tag)
    if release is None:
        say(f"no release for {tag} yet: a draft will be created")
        existing: dict[str, dict[str, Any]] = {}
    else:
        say(f"found {'draft' if release.get('draft') else 'published'} release {release.get('id')} for {tag}")
        existing = {a["name"]: a for a in gh.list_assets(int(release["id"]))}
    plan = ReleasePlan(
        tag=tag,
        release=release,
        existing=existing,
        assets=assets,
        split=split,
        manifests=manifests,
        failures=check_failures(manifests, expected_checks),
    )
    remote_sums: dict[str, str] = {}
    sums_asset = existing.get(CHECKSUMS_NAME)
    if sums_asset is not None and sums_asset.get("state", "uploaded") == "uploaded":
        remote_sums = parse_checksums(gh.download_asset(int(sums_asset["id"])).decode("utf-8", "replace"))
    kept = _compare_assets(gh, plan, remote_sums)
    _plan_checksums(plan, remote_sums, kept, sums_asset, staging)
    # finalize_release renders the notes again, from the release's assets; rendering them now, from what the
    # release will hold, makes notes that GitHub would refuse (over BODY_LIMIT) fail before the first upload.
    sizes = {n: int(a.get("size", 0)) for n, a in existing.items()} | {a.name: a.size for a in assets}
    precisions = {a.name: a.precision or "" for a in assets}
    rows = [(n, sizes[n], plan.sums[n], precisions.get(n, "")) for n in sorted(sizes) if _notes_row(n, plan.sums)]
    all_split: dict[str, list[str]] = {}
    for name in sorted(sizes):
        if _SPLIT_NAME.match(name):
            all_split.setdefault(_original_name(name), []).append(name)
    fit_notes(release.get("body") if release else None, rows, all_split, manifests, tag=tag)
    if release is not None and not plan.draft and release.get("immutable") and (plan.to_upload or plan.stale):
        raise PublishFailed(
            f"release {tag} is published and immutable: GitHub accepts no new assets "
            f"({', '.join(a.name for a in plan.to_upload)}); nothing was uploaded",
            hint="let cecai-convert publish create the release (push the tag only: it makes a draft, uploads, "
            "then publishes), or publish these files under a new tag",
        )
    return plan


def _notes_row(name: str, sums: Mapping[str, str]) -> bool:
    """Whether an asset gets a row in the notes' files table: a GGUF file or part this tool vouches for."""
    return name.endswith(".gguf") and name in sums


def _compare_assets(gh: GitHubClient, plan: ReleasePlan, remote_sums: Mapping[str, str]) -> dict[str, str]:
    """Sort each asset into upload / unchanged / replaced; returns the manifests kept as they are on the release
    (name → the sha256 of the release's copy).

    Raises:
        PublishFailed: a name is taken by a different file that may not be replaced.
    """
    kept: dict[str, str] = {}
    conflicts: list[str] = []
    for asset in plan.assets:
        remote = plan.existing.get(asset.name)
        if remote is None:
            plan.to_upload.append(asset)
        elif remote.get("state", "uploaded") != "uploaded":  # left over by an interrupted upload
            plan.stale.append(remote)
            plan.to_upload.append(asset)
        else:
            same = _identical(remote, asset, remote_sums)
            if same:
                plan.unchanged.append(asset.name)
            elif asset.kind == "manifest":
                # A manifest is ours and derived: the same content but other timings is the same release; other
                # content (a check re-run, a new pair) replaces it where the release still accepts changes.
                body = gh.download_asset(int(remote["id"]))
                if _same_manifest(body, asset.path):
                    plan.unchanged.append(asset.name)
                    kept[asset.name] = hashlib.sha256(body).hexdigest()
                elif plan.release is not None and draft_or_mutable(plan.release):
                    plan.to_upload.append(asset)
                    plan.replaced.append(asset.name)
                else:
                    conflicts.append(f"{asset.name} (the check records changed)")
            else:
                conflicts.append(asset.name if same is False else f"{asset.name} (no checksum to compare)")
    plan.stale += [a for n, a in plan.existing.items() if n.endswith(PARTIAL_SUFFIX)]
    if conflicts:
        raise PublishFailed(
            f"release {plan.tag} already has different files named {', '.join(conflicts)}; nothing was uploaded",
            hint="cecai-converter never replaces a release asset. Delete the old asset on the release page if the "
            "new file should replace it, or publish to a new tag",
        )
    return kept


def _plan_checksums(
    plan: ReleasePlan,
    remote_sums: Mapping[str, str],
    kept: Mapping[str, str],
    sums_asset: Mapping[str, Any] | None,
    staging: Path,
) -> None:
    """SHA256SUMS: what the release already vouches for, plus this run's files; staged and planned for upload
    when it changed."""
    existing = plan.existing
    sums = {n: d for n, d in remote_sums.items() if n in existing and n != CHECKSUMS_NAME}
    for name, remote in existing.items():
        digest = remote.get("digest")
        ours = name.endswith((".gguf", ".manifest.json"))  # other files on the release are not vouched for
        if ours and name not in sums and isinstance(digest, str) and digest.startswith("sha256:"):
            sums[name] = digest.removeprefix("sha256:")
    sums.update({a.name: a.sha256 for a in plan.assets})
    sums.update(kept)
    plan.sums = {n: d for n, d in sums.items() if not n.endswith(PARTIAL_SUFFIX)}
    sums_path = staging / CHECKSUMS_NAME
    atomic_write_text(sums_path, checksums_text(plan.sums))
    sums_local = LocalAsset(CHECKSUMS_NAME, sums_path, sums_path.stat().st_size, sha256_file(sums_path), "checksums")
    if sums_asset is not None and sums_asset.get("state", "uploaded") != "uploaded":
        plan.stale.append(dict(sums_asset))
        plan.to_upload.append(sums_local)
    elif sums_asset is None or remote_sums != plan.sums:
        plan.to_upload.append(sums_local)
    else:
        plan.unchanged.append(CHECKSUMS_NAME)


def upload_release(
    gh: GitHubClient,
    plan: ReleasePlan,
    *,
    target_commitish: str | None = None,
    retries: int = 2,
    say: Callable[[str], None] = _log.info,
) -> PublishResult:
    """Carry out ``plan``'s uploads: create the draft if there is none, remove leftovers, upload (under temporary
    names where the release is published or a name is replaced), then rename into place.

    Raises:
        PublishFailed: an upload failed; every asset this run uploaded was removed again.
    """
    release = plan.release
    created = release is None
    if release is None:
        say(f"creating a draft release for {plan.tag}")
        release = gh.create_release(plan.tag, body="", target_commitish=target_commitish)
        plan.release = release
    draft = plan.draft
    result = PublishResult(
        tag=plan.tag,
        release_id=int(release["id"]),
        html_url=str(release.get("html_url", "")),
        draft=draft,
        created=created,
        unchanged=plan.unchanged,
        split=plan.split,
    )
    uploaded: list[dict[str, Any]] = []  # this run's assets, removed again if anything fails
    attempted: set[str] = set()
    try:
        for old in plan.stale:
            say(f"removing the leftover of an interrupted upload: {old['name']}")
            gh.delete_asset(int(old["id"]))
        for asset in plan.to_upload:
            # A published release never shows a half-done file: upload under a temporary name, rename at the end.
            # So does SHA256SUMS, which replaces the one already there.
            temp = not draft or asset.name in plan.existing
            name = asset.name + PARTIAL_SUFFIX if temp else asset.name
            say(f"uploading {asset.name} ({decimal_size(asset.size)})")
            attempted.add(name)
            uploaded.append({**_upload_with_retries(gh, release, asset.path, name, retries), "_final": asset.name})
        for item in uploaded:
            if item["name"] != item["_final"]:
                replaced = plan.existing.get(item["_final"])
                if replaced is not None and replaced not in plan.stale:
                    gh.delete_asset(int(replaced["id"]))
                gh.rename_asset(int(item["id"]), item["_final"])
                item["name"] = item["_final"]
    except BaseException as exc:
        removed = _cleanup(gh, result.release_id, uploaded, attempted)
        if isinstance(exc, ConverterError):
            raise PublishFailed(
                f"{exc.message}; removed the {removed} asset(s) this run had uploaded, "
                f"release {plan.tag} left {'a draft' if draft else 'as it was'}",
                hint=(exc.hint + ". " if exc.hint else "") + "Re-run the job: files already there are skipped",
            ) from exc
        raise
    result.uploaded = [a.name for a in plan.to_upload]
    result.replaced = plan.replaced
    for name in plan.replaced:
        say(f"replaced {name}: the check records in it changed")
    return result


def finalize_release(
    gh: GitHubClient,
    plan: ReleasePlan,
    result: PublishResult,
    *,
    publish: bool = True,
    say: Callable[[str], None] = _log.info,
) -> PublishResult:
    """Write the release notes and publish the draft, unless a check failed or ``publish`` is False.

    Raises:
        ChecksFailed: a check failed or is missing; everything was uploaded and the release left a draft.
    """
    release = plan.release
    assert release is not None  # created by upload_release
    final = {a["name"]: a for a in gh.list_assets(result.release_id)}
    precisions = {a.name: a.precision or "" for a in plan.assets}
    rows = [
        (name, int(final[name].get("size", 0)), plan.sums[name], precisions.get(name, ""))
        for name in sorted(final)
        if _notes_row(name, plan.sums)
    ]
    all_split: dict[str, list[str]] = {}
    for name in sorted(final):
        if _SPLIT_NAME.match(name):
            all_split.setdefault(_original_name(name), []).append(name)
    state = "every file was uploaded; the release was left as it was (a draft stays a draft)"
    body = fit_notes(release.get("body"), rows, all_split, plan.manifests, tag=plan.tag, state=state)
    changes: dict[str, Any] = {}
    draft = bool(release.get("draft"))
    if body != (release.get("body") or "") and (draft or not release.get("immutable")):
        changes["body"] = body
    if draft and publish and not plan.failures:
        changes["draft"] = False
    if changes:
        if changes.get("draft") is False:
            say(f"publishing release {plan.tag}")
        updated = gh.update_release(result.release_id, **changes)
        result.draft = bool(updated.get("draft"))
        result.html_url = str(updated.get("html_url", result.html_url))
    if plan.failures:
        state = "left a draft" if result.draft else "already published, left as it was"
        raise ChecksFailed(
            f"release {plan.tag} {state}: " + "; ".join(plan.failures),
            hint="every file was uploaded; fix the failing pair (or relax its limits) and re-run the workflow: "
            "identical files are skipped and the draft is published once every check passes",
            result=result,
        )
    return result


def publish_release(
    inputs: Sequence[Path],
    *,
    repo: str,
    tag: str,
    token: str,
    api_url: str | None = None,
    publish: bool = True,
    size_limit: int = SIZE_LIMIT,
    target_commitish: str | None = None,
    retries: int = 2,
    client: GitHubClient | None = None,
    on_progress: Callable[[str], None] | None = None,
    checks: Sequence[Path] = (),
    expected_checks: Sequence[tuple[str, str]] | None = None,
) -> PublishResult:
    """Attach the conversion outputs in ``inputs`` to the release for ``tag`` (see the module docstring):
    :func:`plan_release`, then :func:`upload_release`, then :func:`finalize_release`.

    With ``checks`` (check records of ``cecai-convert check``, files or folders), each model's manifest is published
    with a record per pair and the notes get a files × pairs table. A failed check, or a pair of
    ``expected_checks`` ((model, pair) pairs) without a record, leaves the release a draft: everything is uploaded,
    nothing is published, and :class:`ChecksFailed` says why.

    Args:
        inputs: conversion output folders and/or ``.gguf`` files (see :func:`collect_assets`).
        repo: ``owner/name``.
        tag: the release's tag.
        token: a GitHub token with ``contents: write``.
        api_url: the REST base URL; default ``GITHUB_API_URL`` or github.com.
        publish: publish the draft at the end; False leaves it a draft for review.
        size_limit: files of this many bytes or more are split; smaller in tests.
        target_commitish: the commit a new release's tag is created at, if the tag does not exist yet.
        retries: extra attempts per upload after a failure.
        client: a ready client (tests).
        on_progress: called with one line per step.
        checks: check records, or folders holding them.
        expected_checks: (model name, pair name) pairs that must each have a record.

    Raises:
        UsageError: bad inputs (see :func:`collect_assets`).
        PublishFailed: a name is taken by a different file, the release is immutable and something is new, or
            GitHub failed; in every case the release is left as it was.
    """
    if not 0 < size_limit <= SIZE_LIMIT:
        raise UsageError(f"the split size must be between 1 and {SIZE_LIMIT} bytes, got {size_limit}")
    say = on_progress or _log.info
    gh = client or GitHubClient(repo, token, api_url=api_url)
    with tempfile.TemporaryDirectory(prefix="cecai-publish-") as tmp:
        plan = plan_release(
            gh,
            inputs,
            tag=tag,
            staging=Path(tmp),
            size_limit=size_limit,
            checks=checks,
            expected_checks=expected_checks,
            say=say,
        )
        result = upload_release(gh, plan, target_commitish=target_commitish, retries=retries, say=say)
        return finalize_release(gh, plan, result, publish=publish, say=say)


def draft_or_mutable(release: Mapping[str, Any]) -> bool:
    """Whether the release still accepts replaced assets: a draft, or a published release that is not immutable."""
    return bool(release.get("draft")) or not release.get("immutable")


def _same_manifest(remote: bytes, local: Path) -> bool:
    """Whether the release's copy of a manifest and ours differ only in run-to-run fields (:func:`stable_view`).

    Compared as JSON, not as :class:`Manifest`: the release's copy may come from another version of this tool.
    """
    from .untrusted_json import loads_bounded

    try:  # the release's copy comes from the network: bounded, like every JSON someone else wrote
        theirs = loads_bounded(remote, what="the release's manifest", allow_nan=True, max_bytes=64 * 1024 * 1024)
        ours = json.loads(local.read_text(encoding="utf-8"))
    except (ConverterError, ValueError, UnicodeDecodeError):
        return False
    return bool(stable_view(theirs) == stable_view(ours))


def _upload_with_retries(
    gh: GitHubClient, release: Mapping[str, Any], path: Path, name: str, retries: int
) -> dict[str, Any]:
    for attempt in range(retries + 1):
        try:
            return gh.upload_asset(release, path, name)
        except GitHubAPIError as exc:
            if attempt == retries or exc.status in (401, 403, 404, 422):
                raise
            _log.warning(f"warning: uploading {name} failed ({exc.message}); retrying")
            time.sleep(min(2**attempt, 10))
            # GitHub keeps a failed upload as an asset in state "starter": remove it before trying again.
            for asset in gh.list_assets(int(release["id"])):
                if asset.get("name") == name:
                    gh.delete_asset(int(asset["id"]))
    raise AssertionError("unreachable")  # pragma: no cover


def _cleanup(gh: GitHubClient, release_id: int, uploaded: list[dict[str, Any]], attempted: set[str]) -> int:
    """Best effort: remove this run's uploads and what a failed upload left behind; returns how many were removed."""
    removed = 0
    try:
        for asset in uploaded:
            gh.delete_asset(int(asset["id"]))
            removed += 1
        done = {int(a["id"]) for a in uploaded}
        for asset in gh.list_assets(release_id):
            if asset.get("name") in attempted and int(asset["id"]) not in done:
                gh.delete_asset(int(asset["id"]))
    except ConverterError as exc:  # the original failure matters more
        _log.warning(f"warning: could not remove every partial upload: {exc.message}")
    return removed


# ------------------------------------------------------------------------------------------------ Hugging Face Hub


def push_to_hub(
    inputs: Sequence[Path],
    repo_id: str,
    *,
    token: str | None,
    revision: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
    card: str | None = None,
    checks: Sequence[Path] = (),
) -> str:
    """Upload the GGUF files (unsplit: the Hub takes large files), release manifests (as on GitHub: no host paths,
    ``checks`` merged in; see :func:`release_manifest`) and SHA256SUMS to a model repo, and ``card`` (see
    ``card.render_card``), when given, as the repo's ``README.md``.

    Returns the commit URL.

    Raises:
        UsageError: bad inputs (see :func:`collect_assets`) or check records, before anything is uploaded.
        PublishFailed: the Hub refused the upload.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .check import read_records

    assets = collect_assets(inputs)
    records = read_records(list(checks)) if checks else []
    hub = api if api is not None else HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cecai-hub-") as tmp:
        files, _ = _attach_checks(assets, records, Path(tmp))
        sums = Path(tmp) / CHECKSUMS_NAME
        atomic_write_text(sums, checksums_text({a.name: a.sha256 for a in files}))
        ops = [CommitOperationAdd(path_in_repo=a.name, path_or_fileobj=str(a.path)) for a in files]
        ops.append(CommitOperationAdd(path_in_repo=CHECKSUMS_NAME, path_or_fileobj=str(sums)))
        if card is not None:
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        try:
            hub.create_repo(repo_id, repo_type="model", exist_ok=True)
            info = hub.create_commit(
                repo_id,
                operations=ops,
                commit_message=commit_message or f"Add {len(files)} file(s) from cecai-converter",
                revision=revision,
            )
        except Exception as exc:  # huggingface_hub raises many types (HTTP, auth, validation)
            raise PublishFailed(
                f"pushing to the Hugging Face repo {repo_id} failed: {type(exc).__name__}: {exc}",
                hint="check HF_TOKEN (it needs write access to the repo) and the repo id",
            ) from None
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------------------------- the CLI


def _run(args: argparse.Namespace, out: Output) -> int:
    repo = args.repo or os.environ.get("GITHUB_REPOSITORY", "")
    token = os.environ.get("GITHUB_TOKEN", "")
    inputs = [Path(p) for p in args.inputs]
    if not args.tag and not args.hf_repo:
        raise UsageError("give --tag (a GitHub release) and/or --hf-repo (a Hugging Face repo)")
    data: dict[str, Any] = {}
    lines: list[str] = []
    if args.tag:
        result = publish_release(
            inputs,
            repo=repo,
            tag=args.tag,
            token=token,
            publish=not args.draft,
            size_limit=args.split_size,
            target_commitish=args.target,
            on_progress=out.info,
            checks=[Path(c) for c in args.checks or []],
            expected_checks=[_expected(e) for e in args.expect_check or []] or None,
        )
        data = result.as_dict()
        state = "draft" if result.draft else "published"
        lines.append(f"release {result.tag} ({state}): {result.html_url}")
        lines += [f"  uploaded  {n}" for n in result.uploaded]
        lines += [f"  unchanged {n}" for n in result.unchanged]
        lines += [f"  replaced  {n}" for n in result.replaced]
        lines += [f"  split     {orig} -> {len(parts)} parts" for orig, parts in result.split.items()]
    if args.hf_repo:
        from .card import hub_card

        card = hub_card(inputs, args.hf_repo, [Path(c) for c in args.checks or []])
        url = push_to_hub(
            inputs,
            args.hf_repo,
            token=os.environ.get("HF_TOKEN") or None,
            revision=args.hf_revision,
            card=card,
            checks=[Path(c) for c in args.checks or []],
        )
        data["hub_commit_url"] = url
        lines.append(f"pushed to {args.hf_repo}: {url}")
    out.result("\n".join(lines), data)
    return 0


def _expected(value: str) -> tuple[str, str]:
    model, sep, pair = value.rpartition(":")
    if not sep or not model:
        raise UsageError(f"--expect-check wants MODEL:PAIR, got {value!r}")
    from .pairs import parse_pair

    return model, parse_pair(pair).name


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``publish`` command."""
    parser = subparsers.add_parser(
        "publish",
        help="attach GGUF files, manifests and SHA256SUMS to a GitHub release (and/or push to the Hub)",
        description="Attach conversion outputs to the GitHub release for --tag: a draft is found or created, files "
        "are uploaded (split below 2 GB in llama.cpp's split format when needed), then it is published. "
        "Re-runs skip identical files and never replace other assets. The token comes from GITHUB_TOKEN "
        "(and HF_TOKEN for --hf-repo) only.",
    )
    parser.add_argument("inputs", nargs="+", metavar="PATH", help="conversion output folders or .gguf files")
    parser.add_argument("--tag", help="the release tag")
    parser.add_argument("--repo", help="owner/name (default: GITHUB_REPOSITORY)")
    parser.add_argument("--draft", action="store_true", help="leave the release a draft")
    parser.add_argument("--target", metavar="COMMIT", help="commit for the tag, if the tag does not exist yet")
    parser.add_argument(
        "--split-size",
        type=int,
        default=SIZE_LIMIT,
        metavar="BYTES",
        help=f"split GGUF files of this size or more (default and maximum {SIZE_LIMIT})",
    )
    parser.add_argument(
        "--checks",
        action="append",
        metavar="PATH",
        help="check records (`cecai-convert check`), or folders holding them: merged into each model's manifest and "
        "the release notes; a failed one leaves the release a draft (repeatable)",
    )
    parser.add_argument(
        "--expect-check",
        action="append",
        metavar="MODEL:PAIR",
        help="a check that must have a record, else the release stays a draft (repeatable)",
    )
    parser.add_argument("--hf-repo", metavar="REPO_ID", help="also push to this Hugging Face model repo (HF_TOKEN)")
    parser.add_argument("--hf-revision", metavar="BRANCH", help="the Hub branch to commit to (default: main)")
    parser.set_defaults(handler=_run)
