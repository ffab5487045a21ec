"""The job summary's Markdown (``$GITHUB_STEP_SUMMARY``) for the composite actions' steps (``gha``).

One section per conversion (:func:`conversion_summary`: a row per file with its precision, size, SHA-256 prefix and
the time it took to make, then the verification and fidelity time), per check record (:func:`check_summary`: the
runtime and a row per file with its agreement with the builder's runtime), and per failed step
(:func:`failure_summary`: the error's title, message, hint and the tool's last output). Every value from a record
goes through the one Markdown escaper (``markdown``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConverterError
from .manifest import Manifest
from .manifest_fields import ListedFile, read_fields
from .markdown import code, code_block, inline
from .output import decimal_size
from .records import Agreement, CheckRecord
from .source_parity import summary

__all__ = ["check_summary", "conversion_summary", "failure_summary"]


def _peak(agreement: Agreement) -> str:
    """A check's peak memory (recorded in MiB, ``peak_rss_mib``) in the sizes' unit family."""
    peak = agreement.peak_rss_mib
    return "" if peak is None else decimal_size(peak * 2**20)


def _seconds(manifest: Manifest, precision: str) -> float | None:
    """How long making one file took: its quantization, or the conversion for a file the converter wrote."""
    quantize = manifest.seconds("quantize_s")
    if precision in quantize:
        return quantize[precision]
    return manifest.total_seconds("convert_s")  # written by the converter itself (F16, BF16, Q8_0...)


def _per_runtime(seconds: Mapping[str, float]) -> str:
    """``verify_s``/``fidelity_s`` (keyed by runtime label: ``all`` or ``n_gpu_layers=N``) as one phrase."""
    if set(seconds) == {"all"}:
        return f"{seconds['all']:.1f} s"
    return ", ".join(f"{value:.1f} s ({inline(label)})" for label, value in seconds.items())


def conversion_summary(result: Mapping[str, Any], manifest: Manifest | None, *, title: str) -> str:
    """A Markdown section for one conversion: one row per file (file, precision, size, sha256 prefix, the time it
    took to make), then the time verification and fidelity took (one load per file and runtime, all files
    together) and the total."""
    manifest = manifest or Manifest()
    lines = [
        f"### {inline(title)}",
        "",
        "| File | Precision | Size | SHA-256 | Time |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    # `convert --json`'s reply lists the manifest's file entries (FileEntry.to_dict, with their path)
    listed = result.get("files")
    for entry in [read_fields(ListedFile, e) for e in listed] if isinstance(listed, list) else []:
        precision = entry.precision or ""
        seconds = _seconds(manifest, precision)
        if entry.role == "mmproj":  # a vision model's projector file (multimodal.py), made by its own run
            precision, seconds = f"mmproj {precision}", manifest.seconds("mmproj_s").get(precision)
        lines.append(
            f"| {code(entry.name or '', cell=True)} | {inline(precision)} "
            f"| {decimal_size(entry.bytes or 0)} | {code((entry.sha256 or '')[:12], cell=True)} "
            f"| {'' if seconds is None else f'{seconds:.1f} s'} |"
        )
    verify, fidelity = manifest.seconds("verify_s"), manifest.seconds("fidelity_s")
    if verify or fidelity:
        lines.append("")
    if verify:
        lines.append(f"Verification (load and generate, every file): {_per_runtime(verify)}.")
    if fidelity and not verify:  # the fidelity worker verified each file in the same load (fidelity.py)
        lines.append(
            f"Verification and fidelity (one load of each new file: generate, then measure against the base): "
            f"{_per_runtime(fidelity)}."
        )
    elif fidelity:
        lines.append(f"Fidelity (against the base, every new file): {_per_runtime(fidelity)}.")
    if manifest.source_parity is not None:  # the base against its source model (source_parity.py)
        lines += ["", f"Faithful to the source: {inline(summary(manifest.source_parity))}."]
    total = manifest.total_seconds("total_s")
    if total is not None:
        lines += ["", f"Total: {total:.1f} s."]
    return "\n".join(lines) + "\n\n"


def failure_summary(exc: ConverterError, what: str) -> str:
    """A Markdown section for a step that failed with ``exc`` while doing ``what``."""
    # The message and hint quote values from inputs (file names, a tool's output): shown, never rendered.
    lines = [f"### ❌ {inline(what)}: {inline(exc.title)}", "", inline(exc.message)]
    if exc.hint:
        lines += ["", f"**What to do:** {inline(exc.hint)}"]
    tail = getattr(exc, "output_tail", "")
    if tail:
        lines += ["", "<details><summary>Last output</summary>", "", *code_block(tail[-4000:]), "", "</details>"]
    return "\n".join(lines) + "\n\n"


def check_summary(record: CheckRecord | Mapping[str, Any]) -> str:
    """A job-summary table for one check record."""
    record = CheckRecord.of(record)
    rt = record.runtime_record
    state = "✅ passed" if record.passed else "❌ failed"
    lines = [
        f"### Check {inline(record.pair)}: {state}",
        "",
        f"Runtime: {inline(rt.device)} on {inline(rt.machine)}, llama-cpp-python "
        f"{inline(rt.llama_cpp_python)}, backend {inline(rt.backend)}"
        + (f", image {code(rt.image)}" if rt.image else ""),
        "",
        "| File | SHA-256 | KLD vs builder | Top-1 | Prompt tok/s | Gen tok/s | Peak memory | GPU layers | Result |",
        "| --- | --- | --: | --: | --: | --: | --: | --: | --- |",
    ]

    def num(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    def layers(value: int | None) -> str:
        return "" if value is None else str(value)

    for row in record.rows:
        a = row.agreement_record or Agreement()
        lines.append(
            f"| {code(row.name, cell=True)} | {'match' if row.sha256_match else '**differs**'} | "
            f"{num(a.kld_mean, '.2e')} | {num(a.top1_agreement, '.1%')} | {num(a.prompt_tps, '.0f')} | "
            f"{num(a.gen_tps, '.0f')} | {_peak(a)} | "
            f"{layers(a.offloaded_layers)}/{layers(a.total_layers)} | "
            f"{'ok' if row.passed else inline('; '.join(row.problems or ['failed']))} |"
        )
    lines += [f"- {inline(p)}" for p in record.problems or []]
    return "\n".join(lines) + "\n\n"
