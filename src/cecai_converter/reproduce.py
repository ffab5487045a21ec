"""``reproduce``: rebuild a conversion from what its manifest records and compare every file's SHA-256.

The manifest records every input the bytes depend on: the source (a local folder's content fingerprint and
per-file hashes, or a Hub repo id at a resolved commit), the llama.cpp pin, the precisions, the base type and the
importance matrix. :func:`reproduce` checks each input it can before it spends minutes converting (a different
toolchain pin is refused: its bytes are not expected to match), runs the ordinary pipeline into a fresh folder
(the original outputs are never touched), and compares. When a file differs it names the recorded input that
changed, as far as the records allow (which source files, the imatrix).

Quantized bytes are the same for the same inputs on one CPU architecture, not across architectures (see the field
notes): a mismatch on another architecture is reported with that caveat.
"""

from __future__ import annotations

import platform
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import load_manifest_file
from .errors import ToolchainError, UsageError
from .fsutil import sha256_file
from .imatrix import default_calibration_text
from .manifest import MANIFEST_NAME, Manifest
from .manifest_fields import Source, SourceFile
from .names import check_plain_name, show
from .output import Output
from .pipeline import Job, Target, run_job
from .precisions import parse_precision
from .quant_types import recorded_tensor_types
from .request_options import Options
from .source import check_model_dir, check_repo_id
from .toolchain import toolchain_info

__all__ = ["FileResult", "ReproduceResult", "render", "reproduce", "source_differences"]


@dataclass(frozen=True)
class FileResult:
    """One recorded file and its rebuilt twin."""

    name: str
    precision: str
    recorded: str
    rebuilt: str | None

    @property
    def matches(self) -> bool:
        """Whether the rebuilt bytes are the recorded ones."""
        return self.rebuilt == self.recorded


@dataclass
class ReproduceResult:
    """What :func:`reproduce` found.

    Attributes:
        files: one row per recorded file.
        changed_inputs: the recorded inputs found different (``source: config.json changed`` ...).
        workdir: where the files were rebuilt (removed afterwards unless the caller gave it).
        machine: the CPU architecture this rebuild ran on.
    """

    files: list[FileResult]
    changed_inputs: list[str] = field(default_factory=list)
    workdir: Path | None = None
    machine: str = field(default_factory=platform.machine)

    @property
    def ok(self) -> bool:
        """Every file rebuilt to the recorded bytes."""
        return bool(self.files) and all(f.matches for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        """The JSON result."""
        return {
            "ok": self.ok,
            "machine": self.machine,
            "workdir": str(self.workdir) if self.workdir else None,
            "changed_inputs": self.changed_inputs,
            "files": [
                {
                    "name": f.name,
                    "precision": f.precision,
                    "recorded": f.recorded,
                    "rebuilt": f.rebuilt,
                    "match": f.matches,
                }
                for f in self.files
            ],
        }


def source_differences(recorded: Sequence[SourceFile], found: Sequence[SourceFile]) -> list[str]:
    """Which source files differ between two fingerprint records (``source.files``), by path and SHA-256."""
    old = {str(r.path): r for r in recorded}
    new = {str(r.path): r for r in found}
    out = [f"{p} changed" for p in sorted(old.keys() & new.keys()) if old[p].sha256 != new[p].sha256]
    out += [f"{p} is missing" for p in sorted(old.keys() - new.keys())]
    out += [f"{p} was added" for p in sorted(new.keys() - old.keys())]
    return out


def _check_toolchain(manifest: Manifest) -> None:
    recorded = manifest.toolchain_record
    here = toolchain_info()
    if (recorded.llama_cpp_python, recorded.sdist_sha256) != (here.llama_cpp_python, here.sdist_sha256):
        raise ToolchainError(
            f"the files were made with llama-cpp-python {recorded.llama_cpp_python} (sdist "
            f"{str(recorded.sdist_sha256)[:12]}…), this cecai-converter pins {here.llama_cpp_python} "
            f"(sdist {here.sdist_sha256[:12]}…): another llama.cpp makes other bytes, so nothing was rebuilt",
            hint=f"install the cecai-converter release that pins llama-cpp-python {recorded.llama_cpp_python} "
            "(its `cecai-convert toolchain` shows the pin) and run reproduce with it",
        )


def _local_source(manifest: Manifest, given: Path | None) -> Path:
    recorded_path = manifest.source_path
    if given is None and not recorded_path:
        raise UsageError(
            "this manifest records no source folder (a published <model>.manifest.json drops host paths)",
            hint="give the model folder the files were made from: --source PATH",
        )
    folder = (given or Path(str(recorded_path))).resolve()
    if not folder.is_dir():
        raise UsageError(
            f"the source folder {folder} does not exist",
            hint="give the model folder the files were made from: --source PATH",
        )
    # The cheap checks of a model folder now, before the rebuild fetches the pinned llama.cpp (minutes on a fresh
    # machine) only to refuse the folder after it.

    check_model_dir(folder)
    return folder


def _source_change(recorded: Source, rebuilt: Source, folder: str) -> str | None:
    """How the rebuild's source differs from the recorded one, by file; None when the fingerprints agree.

    The rebuild fingerprints the source itself (and records every file), so the comparison reads its manifest
    instead of hashing the model a second time.
    """
    if rebuilt.fingerprint == recorded.fingerprint:
        return None
    details = source_differences(recorded.files, rebuilt.files)
    what = "; ".join(details[:20]) + (f"; and {len(details) - 20} more" if len(details) > 20 else "")
    return f"source fingerprint: {folder} is not the recorded source" + (
        f" ({what})" if what else " (no per-file record to compare)"
    )


def _imatrix(
    manifest: Manifest, manifest_dir: Path, given: Path | None, work: Path, changed: list[str]
) -> tuple[Path | None, bool]:
    """The importance matrix to quantize with, copied under its recorded name into ``work`` (llama.cpp writes the
    name into every file it quantizes), or ``(None, True)`` to compute it again from the shipped text."""
    record = manifest.imatrix_record
    if record is None or not manifest.imatrix:  # an empty record ({}) records no matrix either
        if given is not None:
            raise UsageError("--imatrix given, but the manifest records no importance matrix")
        return None, False
    name, sha = record.file, str(record.sha256)
    why = check_plain_name(name)
    if why is not None:  # the copy below is named after it: never a path out of the work folder
        raise UsageError(f"the manifest's imatrix.file is not a file name: {why}")
    assert isinstance(name, str)  # check_plain_name said so
    candidate = given if given is not None else manifest_dir / name
    if candidate.is_file():
        found = sha256_file(candidate)
        if found != sha and (given is not None or record.source != "computed"):
            raise UsageError(
                f"the importance matrix {candidate} has SHA-256 {found}, the manifest records {sha} for {name}",
                hint="give the imatrix file the files were made with: --imatrix FILE",
            )
        if found == sha:
            work.mkdir(parents=True, exist_ok=True)
            copy = work / name
            shutil.copyfile(candidate, copy)
            return copy, False
        changed.append(f"imatrix: {candidate} is not the recorded {name}")
    if record.source == "computed":
        text_sha = record.calibration_text_sha256
        if text_sha and text_sha != sha256_file(default_calibration_text()):
            raise UsageError(
                f"the importance matrix {name} was computed on {record.calibration_text}, not on the shipped "
                "calibration text, and is not next to the manifest",
                hint="give the published matrix: --imatrix FILE",
            )
        return None, True
    raise UsageError(
        f"the files were quantized with the importance matrix {name} (SHA-256 {sha[:16]}…), which is not next to "
        "the manifest",
        hint="give it: --imatrix FILE",
    )


def reproduce(
    manifest_path: Path,
    out: Output,
    *,
    source: Path | None = None,
    workdir: Path | None = None,
    imatrix: Path | None = None,
    threads: int | None = None,
) -> ReproduceResult:
    """Rebuild the files of ``manifest_path`` into a fresh folder and compare their SHA-256s with the records.

    Args:
        manifest_path: an outputs ``manifest.json`` or a published ``<model>.manifest.json``.
        out: progress and messages.
        source: the local model folder (required when the manifest records no path).
        workdir: where to rebuild (must be empty or absent; kept); default: a temporary folder, removed after.
        imatrix: the recorded importance matrix, when it is not next to the manifest.
        threads: quantizer threads.

    Raises:
        ToolchainError: the installed pin is not the recorded one.
        UsageError: the manifest, the source or the imatrix cannot be found, or the workdir is not fresh.
    """

    manifest_path = manifest_path / MANIFEST_NAME if manifest_path.is_dir() else manifest_path
    manifest = load_manifest_file(manifest_path)
    files = manifest.files
    if not files:
        raise UsageError(f"{manifest_path} lists no files to reproduce")
    _check_toolchain(manifest)
    changed: list[str] = []
    src = manifest.source_record
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="cecai-reproduce-")) if workdir is None else workdir.resolve()
    if not own:
        protected = [("folder of the original outputs", manifest_path.parent)]
        if not src.is_hub and (source is not None or src.path is not None):
            protected.append(("model source folder", source or Path(str(src.path))))
        for what, folder in protected:
            folder = folder.resolve()
            if work == folder or folder in work.parents or work in folder.parents:
                raise UsageError(
                    f"--workdir {work} is, is inside or holds the {what} {folder}: reproduce never writes there",
                    hint="give a new folder outside both the outputs and the model source",
                )
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            raise UsageError(f"--workdir {work} is not an empty folder", hint="give a new or empty folder")
    try:
        if src.is_hub:
            if not src.repo_id or not src.revision:
                raise UsageError(f"{manifest_path}: the Hub source records no repo_id and revision")
            model, hub, revision = src.repo_id, True, src.revision

            check_repo_id(model)  # before anything is fetched, as a local folder is checked first
            if not re.fullmatch(r"[0-9a-f]{40}", revision):
                raise UsageError(
                    f"{manifest_path}: source.revision {show(revision)} is not a commit id (40 hex digits)",
                    hint="a manifest records the commit its files were made from; convert again instead of editing it",
                )
        else:
            model, hub, revision = str(_local_source(manifest, source)), False, None
        imatrix_path, compute = _imatrix(manifest, manifest_path.parent, imatrix, work / ".inputs", changed)
        precisions = [parse_precision(f.precision) for f in files]
        base = manifest.base_record.precision
        names = {p.name for p in precisions}
        if isinstance(base, str) and base not in names and len(precisions) == 1:
            # One quantized type alone could be written by the converter directly; the recorded files were
            # quantized from a base of their own, so that base is made again (and not compared).
            precisions.append(parse_precision(base))
        options = Options(
            force=True,
            threads=threads,
            imatrix=imatrix_path,
            compute_imatrix=compute,
            fidelity=False,
            verify=False,
            tensor_types=recorded_tensor_types(manifest.to_dict()),
            # A text-only file of a model with other towers was asked for explicitly: ask again (else refused).
            text_only=(multimodal := manifest.multimodal_record) is not None and multimodal.text_only is True,
        )
        job = Job(
            model=model,
            model_name=str(manifest.model_name),
            precisions=tuple(precisions),
            targets=(Target(outputs_dir=work / "outputs"),),
            options=options,
            hub=hub,
            revision=revision,
        )
        run_job(job, out)
        rebuilt = load_manifest_file(work / "outputs" / MANIFEST_NAME)
        rebuilt_source = rebuilt.source_record
        if hub and rebuilt_source.fingerprint != src.fingerprint:
            changed.append(f"source fingerprint: {src.repo_id}@{src.revision} downloaded other files")
        elif not hub and (change := _source_change(src, rebuilt_source, model)) is not None:
            changed.insert(0, change)  # the first input: the imatrix and base follow from it
        recorded_imatrix = imx.sha256 if (imx := manifest.imatrix_record) is not None else None
        rebuilt_imatrix = imx.sha256 if (imx := rebuilt.imatrix_record) is not None else None
        if compute and recorded_imatrix != rebuilt_imatrix:
            changed.append("imatrix: computing it again gave another matrix (a changed calibration text?)")
        rebuilt_base = rebuilt.base_record.precision
        if rebuilt_base != base:
            changed.append(f"base: rebuilt from {rebuilt_base}, recorded {base}")
        by_name = {f.name: f for f in rebuilt.files}
        results = [
            FileResult(
                name=f.name,
                precision=f.precision,
                recorded=f.sha256,
                rebuilt=twin.sha256 if (twin := by_name.get(f.name)) is not None else None,
            )
            for f in files
        ]
        # A vision model's projector files (mmproj) are rebuilt by the same run and compared alike.
        rebuilt_mmproj = {f.name: f for f in rebuilt.mmproj or []}
        results += [
            FileResult(
                name=f.name,
                precision=f"mmproj {f.precision}",
                recorded=f.sha256,
                rebuilt=twin.sha256 if (twin := rebuilt_mmproj.get(f.name)) is not None else None,
            )
            for f in manifest.mmproj or []
        ]
        return ReproduceResult(results, changed, None if own else work)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def render(result: ReproduceResult) -> str:
    """The human result: a table of files, then what differs and why."""
    width = max(len(f.name) for f in result.files)
    lines = [f"{'file':<{width}}  {'recorded':<16}  {'rebuilt':<16}  result"]
    for f in result.files:
        rebuilt = (f.rebuilt or "(not made)")[:16]
        lines.append(f"{f.name:<{width}}  {f.recorded[:16]:<16}  {rebuilt:<16}  {'same' if f.matches else 'DIFFERS'}")
    if result.ok:
        lines.append(f"all {len(result.files)} file(s) rebuilt to the recorded bytes (on {result.machine})")
    else:
        lines.append("")
        lines += [f"differs: {f.name}" for f in result.files if not f.matches]
        if result.changed_inputs:
            lines += [f"changed input: {c}" for c in result.changed_inputs]
        else:
            lines.append(
                f"no recorded input changed: rebuilt on {result.machine}; quantized bytes differ between CPU "
                "architectures (x86-64, arm64), so compare on the architecture that made the files"
            )
    if result.workdir is not None:
        lines.append(f"rebuilt files kept in {result.workdir / 'outputs'}")
    return "\n".join(lines)
