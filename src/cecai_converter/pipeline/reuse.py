"""What earlier runs left that this one can use: the manifests in the job's folders (read once per run), the inputs
key a file's bytes depend on, files that are still current, and targets with nothing left to do."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..agreement import REFERENCE_NAME, read_reference
from ..errors import ConfigError
from ..manifest import FileEntry, Manifest, file_is_current, inputs_key, read_manifest
from ..precisions import PrecisionInfo
from ..request_options import Options
from ..toolchain import toolchain_info
from .job import FACT_KEYS, Job, Produced, Target

__all__ = ["EarlierRuns", "key_for", "reference_current", "target_current"]


class EarlierRuns:
    """The manifests earlier runs left in the job's folders and their sibling pair folders.

    Each is read once per run (the targets' folders are locked by then), then asked for every lookup (source
    records, reusable files, up-to-date checks, an earlier source check of the same base).
    """

    def __init__(self, job: Job) -> None:
        self._targets = job.targets
        self._read: dict[Path, Manifest | None] = {}

    def manifest(self, folder: Path) -> Manifest | None:
        """The manifest an earlier run left in ``folder`` (None: none)."""
        if folder not in self._read:
            self._read[folder] = read_manifest(folder)
        return self._read[folder]

    def folders(self) -> list[Path]:
        """The targets' folders, then their sibling pair folders (a file made for one pair serves every pair)."""
        folders: list[Path] = [t.outputs_dir for t in self._targets]
        for target in self._targets:
            if target.pair is not None and target.outputs_dir.parent.is_dir():
                folders += [p for p in sorted(target.outputs_dir.parent.iterdir()) if p.is_dir()]
        return list(dict.fromkeys(folders))

    def find_file(self, key: str, precision: PrecisionInfo) -> Produced | None:
        """A current file for ``key`` in any target or sibling pair folder (reused instead of remade)."""
        for folder in self.folders():
            manifest = self.manifest(folder)
            for entry in manifest.files if manifest else []:
                if entry.precision == precision.name and file_is_current(entry, folder, key):
                    return _reused(
                        entry, folder, precision, key, fidelity=entry.fidelity, quantization=entry.quantization
                    )
        return None

    def find_projector(self, key: str, precision: PrecisionInfo) -> Produced | None:
        """A current projector file (``mmproj``) for ``key`` in any target or sibling pair folder."""
        for folder in self.folders():
            manifest = self.manifest(folder)
            for entry in (manifest.mmproj or []) if manifest else []:
                if entry.precision == precision.name and file_is_current(entry, folder, key):
                    return _reused(entry, folder, precision, key)
        return None

    def source_parity(self, base_key: str) -> dict[str, Any] | None:
        """A source check an earlier run recorded for the base made from ``base_key`` (marked reused), or None."""
        for folder in self.folders():
            earlier = self.manifest(folder)
            record = earlier.source_parity if earlier is not None else None
            if isinstance(record, dict) and record.get("checked") and record.get("base_inputs_key") == base_key:
                return {**record, "reused": True}
        return None


def _reused(
    entry: FileEntry,
    folder: Path,
    precision: PrecisionInfo,
    key: str,
    *,
    fidelity: Mapping[str, Any] | None = None,
    quantization: Mapping[str, Any] | None = None,
) -> Produced:
    return Produced(
        path=folder / entry.name, precision=precision, key=key, sha256=entry.sha256,
        facts={k: v for k, v in entry.to_dict().items() if k in FACT_KEYS},
        verification=entry.verification, fidelity=fidelity, made_here=False, origin=folder, quantization=quantization,
    )  # fmt: skip


def key_for(
    options: Options, precision: PrecisionInfo, fingerprint: str, base: PrecisionInfo, imatrix_sha: str | None
) -> str:
    """What the bytes of ``precision`` depend on: the source, the toolchain, and how the file is made (written
    by the converter as the base, or quantized from a base of some type with some importance matrix)."""
    made = "converter" if precision.name == base.name else f"quantized-from-{base.name}"
    # Overrides only where the quantizer applies them, and only when given: keys of files made without any
    # stay what they were, so an upgrade does not remake them.
    quantized = made != "converter"
    overrides = {"tensor_types": list(options.tensor_types)} if options.tensor_types and quantized else {}
    return inputs_key(
        source=fingerprint,
        precision=precision.name,
        toolchain=toolchain_info().as_manifest(),
        made=made,
        imatrix=imatrix_sha if made != "converter" else None,
        **overrides,
    )


def target_current(
    target: Target, manifest: Manifest, keys: Mapping[str, str], n_gpu_layers: int, need_reference: bool
) -> bool:
    """Whether ``manifest`` (the target's, from an earlier run) already lists every wanted file, made from ``keys``
    and verified with ``n_gpu_layers``."""
    if need_reference and not reference_current(target.outputs_dir, {e.name: e.sha256 for e in manifest.files}):
        return False
    if manifest.n_gpu_layers != n_gpu_layers:
        return False  # verified and measured for another runtime setting: check again (the files are reused)
    entries = manifest.by_precision()
    return all(
        name in entries and file_is_current(entries[name], target.outputs_dir, key)
        for name, key in keys.items()
        if target.wants(name)
    )


def reference_current(folder: Path, files: Mapping[str, str]) -> bool:
    """Whether ``folder`` has a reference for exactly the bytes of ``files`` (name → sha256, as a manifest lists)."""
    try:
        reference = read_reference(folder / REFERENCE_NAME)
    except ConfigError:
        return False
    entries = reference["files"]
    return all((entries.get(name) or {}).get("sha256") == sha256 for name, sha256 in files.items())
