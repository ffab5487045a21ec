"""The release notes: this tool's section of a release's description (between :data:`NOTES_START` and
:data:`NOTES_END`; the user's own text is kept), with the files table, each model's files and fidelity, and a
files × pairs table of check results; :func:`fit_notes` keeps them within GitHub's :data:`BODY_LIMIT` (one row per
model when the full tables would not fit).

Every value from a manifest or check record goes through the one Markdown escaper (``markdown``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from ..card import files_table
from ..errors import PublishFailed
from ..manifest import Manifest
from ..markdown import code, inline
from ..output import decimal_size
from ..pairs import PAIRS
from ..records import Agreement, CheckRow
from .assets import CHECKSUMS_NAME
from .manifests import record_problems
from .split import original_name

__all__ = [
    "BODY_LIMIT",
    "NOTES_END",
    "NOTES_START",
    "body_length",
    "checks_table",
    "fit_notes",
    "notes_row",
    "release_notes",
]

NOTES_START: Final = "<!-- cecai-converter:assets -->"
NOTES_END: Final = "<!-- /cecai-converter:assets -->"
#: The longest release description GitHub accepts, in characters.
BODY_LIMIT: Final = 125_000


def _check_cell(row: CheckRow | None, sha256: str) -> str:
    if row is None:
        return "–"
    agr = row.agreement_record or Agreement()
    if not row.vouches_for(sha256):
        problems = [str(p) for p in row.problems or []]
        if row.sha256 != sha256:
            problems.insert(0, "checked other bytes")
        return "❌ " + inline("; ".join(problems or ["failed"]), limit=120)
    speed = "" if agr.gen_tps is None else f"{agr.gen_tps:.0f} tok/s"
    kld = "" if agr.kld_mean is None else f"KLD {agr.kld_mean:.1e}"
    top1 = "" if agr.top1_agreement is None else f"top-1 {agr.top1_agreement:.0%}"
    return "✅ " + " · ".join(x for x in (speed, kld, top1) if x)


def checks_table(manifests: Mapping[str, Manifest]) -> list[str]:
    """Markdown lines: per model, a files × pairs table of the check results (runtime, speed, agreement)."""
    lines: list[str] = []
    for model, manifest in sorted(manifests.items()):
        checks = manifest.check_records
        if not checks:
            continue
        pairs = [p for p in PAIRS if p in checks]
        runtime = {p: checks[p].runtime_record for p in pairs}
        runtimes = ", ".join(f"{p}: {inline(runtime[p].device)} on {inline(runtime[p].machine)}" for p in pairs)
        lines += [f"#### Checked on each pair's runtime: {inline(model)}", "", f"Runtimes: {runtimes}.", ""]
        lines += ["| File | " + " | ".join(pairs) + " |", "| --- |" + " --- |" * len(pairs)]
        for entry in manifest.files:
            cells = []
            for pair in pairs:
                rows = {r.name: r for r in checks[pair].rows}
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
        for model, manifest in sorted(manifests.items()):
            lines += ["", f"#### Files and fidelity: {inline(model)}", "", *files_table(manifest, {})]
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
        mine = [n for n in sizes if original_name(n) in names]
        claimed.update(mine)
        verdicts = [
            f"{inline(pair)} {'❌' if record_problems(record, manifest) else '✅'}"
            for pair, record in sorted(manifest.check_records.items())
        ]
        total = decimal_size(sum(sizes[n] for n in mine))
        lines.append(f"| {inline(model)} | {len(manifest.files)} | {total} | {', '.join(verdicts) or '–'} |")
    others = [n for n in sizes if n not in claimed]
    if others:
        lines.append(f"| other files | {len(others)} | {decimal_size(sum(sizes[n] for n in others))} | – |")
    return lines


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


def notes_row(name: str, sums: Mapping[str, str]) -> bool:
    """Whether an asset gets a row in the notes' files table: a GGUF file or part this tool vouches for."""
    return name.endswith(".gguf") and name in sums
