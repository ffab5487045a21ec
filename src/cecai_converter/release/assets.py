"""What a release publishes from the local files: :class:`LocalAsset`, collected from conversion output folders
(each GGUF file checked against its manifest) and loose ``.gguf`` files (:func:`collect_assets`), asset names GitHub
keeps as they are (:func:`check_asset_names`), and ``SHA256SUMS`` (:func:`checksums_text`, :func:`parse_checksums`).

A manifest is data from an artifact, not an instruction: it may only publish regular files of its own folder whose
bytes match the SHA-256 it records, and every refusal comes before the first request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..card import tensor_types_name
from ..errors import ManifestError, UsageError
from ..fsutil import refuse_symlink, sha256_file
from ..manifest import MANIFEST_NAME, Manifest, load_manifest
from ..names import control_character, show
from ..pairs import PAIRS
from ..quant_types import recorded_tensor_types, tensor_type_file

__all__ = ["CHECKSUMS_NAME", "LocalAsset", "check_asset_names", "checksums_text", "collect_assets", "parse_checksums"]

CHECKSUMS_NAME: Final = "SHA256SUMS"
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
#: Asset names GitHub keeps as they are. It replaces every other character (a space, ``~``, ``:``, ``(``, non-ASCII
#: letters) with ``.`` and renames leading and trailing periods, silently: SHA256SUMS and the manifests would then
#: name files that are not on the release, and a re-run would not find them.
_ASSET_NAME: Final = re.compile(r"[A-Za-z0-9_+-](?:[A-Za-z0-9._+-]*[A-Za-z0-9_+-])?")
_ASSET_CHARS: Final = "ASCII letters, digits, '.', '_', '-' and '+', not starting or ending with '.'"


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
