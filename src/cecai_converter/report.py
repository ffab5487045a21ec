"""``cecai-convert report``: the size/quality trade-off of every produced file, as Markdown and as a plot.

Reads ``outputs/<PAIR>/manifest.json`` files (see ``docs/ARCHITECTURE.md``) and renders, per model, a table of
file, precision, size, bits per weight, KL-divergence, perplexity change, top-1 agreement and speed
(:func:`render_markdown`), and a PNG of file size against KL-divergence with one labelled point per precision
(:func:`plot`). The command prints the Markdown and appends it to ``$GITHUB_STEP_SUMMARY`` when that is set.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from .errors import EXIT_OK, ManifestError, UsageError
from .fsutil import atomic_write_bytes, refuse_symlink, write_target
from .gguf_header import GGUFHeaderError, read_header
from .manifest import MANIFEST_NAME, FileEntry, Manifest, load_manifest
from .manifest_fields import Fidelity, Verification, finite
from .markdown import code, inline
from .output import Output, decimal_size
from .precisions import PRECISIONS
from .quant_types import quantization_record, types_markdown
from .source_parity import summary

__all__ = ["find_manifests", "load_manifests", "plot", "register", "render_markdown"]

_PLOT_SIZE_IN: Final = (8.0, 5.0)
_PLOT_DPI: Final = 100
_DASH: Final = "—"


# --- Markdown --------------------------------------------------------------------------------------------------


def render_markdown(manifests: Sequence[Manifest]) -> str:
    """One section per manifest: a heading, a line on how fidelity was measured, and the table of files.

    Columns: File, Precision, Size, BPW, KLD (mean ± standard error), KLD p99, PPL ratio (± standard error), Top-1
    (± standard error), Prompt tok/s, Gen tok/s; the errors are llama-perplexity's (``fidelity.error_bars``). A file
    without fidelity numbers shows dashes; one measured before the error bars were recorded shows its numbers
    without them, and a dash for the 99th percentile. BPW is the manifest's ``bpw`` if recorded, else measured from
    the GGUF next to the manifest (``manifest.folder``, when it was read from disk: tensor bytes × 8 / weights),
    else llama.cpp's nominal figure for the type, marked ``≈``.
    """
    sections = [_render_one(m) for m in manifests]
    return "\n".join(sections).rstrip() + "\n"


def _title(manifest: Manifest) -> str:
    name = manifest.model_name or "model"
    return f"{name} ({manifest.pair})" if manifest.pair else name


def _render_one(manifest: Manifest) -> str:
    # Every value from the manifest goes through the one escaper (markdown.py): shown, never rendered.
    lines = [f"### {inline(_title(manifest))}", ""]
    files = manifest.files
    measured = [record for f in files if (record := f.fidelity_record) is not None]
    base = manifest.base_record.precision
    if measured:
        first = measured[0]
        devices = sorted({"?" if m.device is None else m.device for m in measured})
        about = [f"Fidelity vs the {inline(base or 'unquantized')} base"]
        counts = sorted({m.n_tokens for m in measured if m.n_tokens is not None})
        if len(counts) == 1:
            about.append(f"on {counts[0]} scored tokens")
        elif counts:  # fidelity's budget: each file read until its error bars were narrow enough
            about.append(f"on {counts[0]}–{counts[-1]} scored tokens (each file until its error bars met the target)")
        if (ppl_base := finite(first.ppl_base)) is not None:
            about.append(f"(base perplexity {ppl_base:.4g})")
        about.append(f"measured on {inline('/'.join(devices))}.")
        lines += [" ".join(about), ""]
    elif files:
        lines += ["No fidelity numbers in this manifest (FIDELITY was off).", ""]
    imx = manifest.imatrix_record
    if imx is not None and imx.file:
        lines += [f"Importance matrix: {code(imx.file)} ({inline('given' if imx.source is None else imx.source)}).", ""]
    if manifest.has("source_parity"):  # the base against its source model (source_parity.py)
        lines += [f"Faithful to the source: {inline(summary(manifest.source_parity))}.", ""]
    header = ["File", "Precision", "Size", "BPW", "KLD", "KLD p99", "PPL ratio", "Top-1", "Prompt tok/s", "Gen tok/s"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---", *["--:"] * (len(header) - 2)]) + "|")
    for f in files:
        fid = f.fidelity_record or Fidelity()
        row = [
            code(f.name, cell=True),
            inline(f.precision),
            _size(f.bytes),
            _bpw(f, manifest.folder),
            _kld_pm(fid.kld_mean, fid.error("kld_mean_se")),
            _kld(fid.kld_p99),
            _ratio_pm(fid),
            _pct_pm(fid.top1_agreement, fid.error("top1_agreement_se")),
            _rate(fid.prompt_tps),
            _rate(fid.gen_tps),
        ]
        lines.append("| " + " | ".join(row) + " |")
    if not files:
        lines.append("| " + " | ".join([_DASH] * len(header)) + " |")
    lines += types_markdown([f.to_dict() for f in files])  # quant_types reads the ``quantization`` records
    lines += _multimodal_lines(manifest)
    return "\n".join(lines) + "\n"


def _multimodal_lines(manifest: Manifest) -> list[str]:
    """The projector files of a vision model (with what the test image gave), or the text-only statement."""
    record = manifest.multimodal_record
    if record is None:
        return []
    if record.text_only is True:
        return ["", f"Text only (`--text-only`): the model's {inline(', '.join(record.left_out))} were left out."]
    lines = ["", "| Projector | Precision | Size | Test image |", "|---|---|--:|---|"]
    for f in manifest.mmproj or []:
        image = f.verification_record or Verification()
        seen = (
            f"{image.image_tokens} image tokens, {len(image.generated_tokens)} tokens generated"
            if image.image_tokens is not None
            else _DASH
        )
        lines.append(f"| {code(f.name, cell=True)} | {inline(f.precision)} | {_size(f.bytes)} | {inline(seen)} |")
    return lines if len(lines) > 3 else []


def _size(n: int) -> str:
    """A file size in the project's one unit family (decimal: KB, MB, GB, as the card and release notes)."""
    return decimal_size(n) if finite(n) is not None else _DASH


def _kld(v: float | None) -> str:
    if finite(v) is None:
        return _DASH if v is None else inline(v)  # NaN or infinity: shown as recorded
    return "0" if v == 0 else f"{v:.3g}"


def _decimals(se: float) -> int:
    """Decimals that show a standard error with two significant digits (0.0014 → 4)."""
    return min(8, max(0, 1 - math.floor(math.log10(se))))


def _kld_pm(v: float | None, se: float | None) -> str:
    value, error = finite(v), finite(se)
    if value is None or error is None or not error > 0:
        return _kld(v)  # no error bar recorded (an older manifest), or none to show (the base against itself)
    d = _decimals(error)
    return f"{value:.{d}f} ± {error:.{d}f}"


def _ratio_pm(fid: Fidelity) -> str:
    ratio, se = finite(fid.ppl_ratio), finite(fid.ppl_ratio_se)
    ppl, ppl_base = finite(fid.ppl), finite(fid.ppl_base)
    if ratio is None and ppl is not None and ppl_base is not None and ppl_base > 0:
        ratio = finite(ppl / ppl_base)  # an older manifest: the same number, without its error
    if ratio is None:
        return _DASH
    if se is None or not se > 0:
        return f"{ratio:.4f}"
    d = max(4, _decimals(se))
    return f"{ratio:.{d}f} ± {se:.{d}f}"


def _pct(v: float | None) -> str:
    value = finite(v)
    return f"{100 * value:.1f}%" if value is not None else _DASH


def _pct_pm(v: float | None, se: float | None) -> str:
    value, error = finite(v), finite(se)
    if value is None or error is None:
        return _pct(v)
    return f"{100 * value:.1f} ± {100 * error:.1f}%"


def _rate(v: float | None) -> str:
    value = finite(v)
    return f"{value:.1f}" if value is not None else _DASH


def _bpw(entry: FileEntry, folder: Path | None) -> str:
    if (bpw := finite(entry.bpw)) is not None:
        return f"{bpw:.2f}"
    if folder is not None and entry.name:
        try:
            measured = _measure_bpw(folder / entry.name)
        except (GGUFHeaderError, OSError):
            return "unreadable GGUF"  # a damaged file is a fact of the report, not a reason to stop it
        if measured is not None:
            return f"{measured:.2f}"
    info = PRECISIONS.get(entry.precision.upper())
    return f"≈{info.bpw:.2f}" if info is not None else _DASH


def _measure_bpw(path: Path) -> float | None:
    """Bits per weight of a GGUF's tensor data (as llama.cpp's quantizer reports it), or None without a file.

    Read with the strict header reader (``gguf_header``): it checks every length against the file size and raises
    only its own error, where ``gguf.GGUFReader`` raised a dozen kinds (IndexError, OverflowError, numpy's errors…)
    on a damaged file, each a traceback.

    Raises:
        SymlinkRefused: the file is a symbolic link (the rule every reader of a GGUF keeps).
        GGUFHeaderError: the file is not a sound GGUF file.
        OSError: it cannot be read.
    """

    refuse_symlink(path)
    if not path.is_file():
        return None

    bpw = quantization_record(read_header(path).tensors, fallbacks=(), overrides=())["bpw"]
    return float(bpw) if bpw is not None else None


# --- the plot --------------------------------------------------------------------------------------------------


def _points(manifest: Manifest) -> list[tuple[str, float, float]]:
    """(precision, size in MB, KLD) for every file with a finite KL-divergence, largest first."""
    points = []
    for f in manifest.files:
        fid = f.fidelity_record
        kld = finite(fid.kld_mean) if fid is not None else None
        if kld is not None and finite(f.bytes) is not None:
            points.append((f.precision, f.bytes / 1e6, kld))
    return sorted(points, key=lambda p: -p[1])


def _figure(manifest: Manifest) -> Any:
    import matplotlib  # plotting is optional (the `local` extra)

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    points = _points(manifest)
    if not points:
        raise UsageError(
            f"no fidelity numbers to plot for {_title(manifest)}",
            hint="run the conversion with FIDELITY: true (the default)",
        )
    fig = Figure(figsize=_PLOT_SIZE_IN, dpi=_PLOT_DPI)
    ax = fig.add_subplot(1, 1, 1)
    labels = [p[0] for p in points]
    sizes = [p[1] for p in points]
    klds = [p[2] for p in points]
    ax.plot(sizes, klds, color="0.75", linewidth=1, zorder=1)
    ax.scatter(sizes, klds, s=36, color="tab:blue", zorder=2)
    # Labels are plain text (parse_math=False): a `$` in a precision, model or pair name is shown, not parsed as
    # mathtext (an unbalanced one made savefig raise).
    for label, x, y in zip(labels, sizes, klds, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9, parse_math=False)
    if min(sizes) > 0 and max(sizes) / min(sizes) > 4:
        ax.set_xscale("log")
    positive = [k for k in klds if k > 0]
    if positive and len(positive) == len(klds):
        if max(positive) / min(positive) > 10:
            ax.set_yscale("log")
    elif positive:
        ax.set_yscale("symlog", linthresh=min(positive))
    base = manifest.base_record.precision or "base"
    ax.set_title(f"{_title(manifest)}: size vs KL-divergence from {base}", parse_math=False)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL-divergence (nats, lower is better)")
    ax.margins(x=0.1, y=0.1)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def plot(manifest: Manifest, png: Path) -> Path:
    """Write a PNG (800×500) of file size against mean KL-divergence, one labelled point per precision.

    Axes go logarithmic where the values span more than a decade (KL-divergence) or a factor of four (size).

    Raises:
        UsageError: no file in the manifest has fidelity numbers.
    """
    import io

    fig = _figure(manifest)
    png = write_target(Path(png))
    # Rendered in memory, then written by the safe writer: savefig(path) would follow a link planted at the name.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_PLOT_DPI)
    atomic_write_bytes(png, buffer.getvalue())
    return png


# --- reading manifests -------------------------------------------------------------------------------------------


def find_manifests(paths: Iterable[Path]) -> list[Path]:
    """Manifest files named directly, or found under the given folders (``outputs/`` or ``outputs/<PAIR>/``).

    Raises:
        UsageError: a path does not exist, or a folder holds no manifest.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            inside = sorted(path.rglob(MANIFEST_NAME))
            if not inside:
                raise UsageError(
                    f"no {MANIFEST_NAME} under {path}",
                    hint="pass a Converter outputs folder (outputs/ or outputs/<PAIR>/) after a run",
                )
            found += inside
        else:
            raise UsageError(f"no such file or folder: {path}")
    return list(dict.fromkeys(p.resolve() for p in found))


def load_manifests(paths: Sequence[Path]) -> list[Manifest]:
    """Read manifest files (builder ``manifest.json`` or published ``*.manifest.json``); each knows its path, so its
    GGUF files can be found next to it for measuring bits per weight.

    Raises:
        ManifestError: a file is not readable JSON or not a schema-1 manifest (the message names the field).
        UsageError: a file vanished after it was found.
    """
    manifests = []
    for path in paths:
        try:
            manifest = load_manifest(Path(path))
        except FileNotFoundError:
            raise UsageError(f"no such file: {path}") from None
        if not manifest.has("files"):
            raise ManifestError(
                f"{path}: files: missing; not a cecai-converter manifest (schema 1)",
                hint="pass outputs/<PAIR>/manifest.json files or the outputs folder",
            )
        manifests.append(manifest)
    return manifests


def _plot_name(manifest: Manifest) -> str:
    stem = manifest.model_name or "model"
    if manifest.pair:
        stem += f".{manifest.pair}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem) + ".fidelity.png"


# --- the command -------------------------------------------------------------------------------------------------


def _run_report(args: argparse.Namespace, out: Output) -> int:
    manifests = load_manifests(find_manifests(args.paths))
    markdown = render_markdown(manifests)
    plots: list[str] = []
    if args.plot is not None:
        for manifest in manifests:
            if not _points(manifest):
                out.warning(f"{_title(manifest)}: no fidelity numbers, no plot")
                continue
            png = plot(manifest, Path(args.plot) / _plot_name(manifest))
            plots.append(str(png))
            out.info(f"wrote {png}")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with Path(summary).open("a", encoding="utf-8") as handle:
            handle.write(markdown + "\n")
    # Keys starting with "_" have always been left out of the JSON (the folder once travelled as one, ``_folder``).
    public = [{k: v for k, v in m.to_dict().items() if not k.startswith("_")} for m in manifests]
    out.result(markdown, {"markdown": markdown, "plots": plots, "manifests": public})
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Add ``report`` to the CLI."""
    parser = subparsers.add_parser(
        "report",
        help="Markdown table (and plots) of size and fidelity for converted models",
        description="Print a Markdown table per model (file, precision, size, bits per weight, KL-divergence, "
        "perplexity change, top-1 agreement, tokens/s) from manifest files; also appended to "
        "$GITHUB_STEP_SUMMARY when that is set.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="MANIFEST_OR_OUTPUTS_DIR",
        help="manifest.json files, or folders searched for them (outputs/ or outputs/<PAIR>/)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="also write <model>[.<PAIR>].fidelity.png (file size vs KL-divergence) per manifest into DIR",
    )
    parser.set_defaults(handler=_run_report)
