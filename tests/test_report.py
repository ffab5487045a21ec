"""``cecai-convert report``: the Markdown table, the size/KL-divergence plot, the command and the step summary."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import write_tiny_gguf

from cecai_converter import report
from cecai_converter.cli import main
from cecai_converter.manifest import Manifest


def fid(kld: float, delta: float, top1: float, *, error_bars: bool = True) -> dict:
    numbers = {
        "kld_mean": kld,
        "ppl": 10.0 * (1 + delta / 100),
        "ppl_base": 10.0,
        "ppl_delta_pct": delta,
        "top1_agreement": top1,
        "prompt_tps": 812.25,
        "gen_tps": 95.5,
        "device": "cpu",
        "n_tokens": 2040,
    }
    if error_bars:  # as fidelity.measure records them since the error bars came in
        numbers |= {
            "kld_mean_se": kld / 24,
            "kld_median": kld / 3,
            "kld_p99": kld * 7.5,
            "kld_p99_9": kld * 20,
            "kld_max": kld * 40,
            "ppl_ratio": 1 + delta / 100,
            "ppl_ratio_se": 0.0021,
            "top1_agreement_se": (top1 * (1 - top1) / 2039) ** 0.5,
        }
    return numbers


def manifest(pair: str | None = "CPU_LLM_LLAMA", *, with_fidelity: bool = True) -> dict:
    rows = [("Q8_0", 1_964_928, 0.0029, -0.17, 0.92), ("Q4_K_M", 1_170_272, 0.34, 0.8, 0.34)]
    rows.append(("Q2_K", 805_632, 1.82, 3.1, 0.015))
    files = [
        {
            "name": f"tiny.{p.lower()}.gguf",
            "precision": p,
            "bytes": size,
            "sha256": "0" * 64,
            "fidelity": fid(k, d, t) if with_fidelity else None,
        }
        for p, size, k, d, t in rows
    ]
    return {
        "schema": 1,
        "model_name": "tiny",
        "pair": pair,
        "base": {"precision": "F32", "kept": False},
        "imatrix": {"file": "tiny.imatrix.gguf", "sha256": "1" * 64, "source": "computed"},
        "files": files,
    }


def typed(data: dict, folder: Path | None = None) -> Manifest:
    """``data`` as the report reads it: a Manifest, read from ``folder/manifest.json`` when a folder is given."""
    return Manifest.from_dict(data, path=None if folder is None else folder / "manifest.json")


def write_manifest(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_markdown_table() -> None:
    md = report.render_markdown([typed(manifest())])
    lines = md.splitlines()
    assert lines[0] == "### tiny (CPU_LLM_LLAMA)"
    assert "Fidelity vs the F32 base on 2040 scored tokens (base perplexity 10) measured on cpu." in md
    assert "Importance matrix: `tiny.imatrix.gguf` (computed)." in md
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| File"))
    assert lines[header] == (
        "| File | Precision | Size | BPW | KLD | KLD p99 | PPL ratio | Top-1 | Prompt tok/s | Gen tok/s |"
    )
    assert lines[header + 1] == "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    rows = lines[header + 2 : header + 5]
    # KLD 0.0029 ± 0.000121 (two significant digits of the error), p99 0.02175, top-1 92 % ± 0.60 %
    assert rows[0] == (
        "| `tiny.q8_0.gguf` | Q8_0 | 2.0 MB | ≈8.50 | 0.00290 ± 0.00012 | 0.0217 | 0.9983 ± 0.0021 "
        "| 92.0 ± 0.6% | 812.2 | 95.5 |"
    )
    assert rows[2].startswith("| `tiny.q2_k.gguf` | Q2_K | 805.6 KB | ≈3.16 | 1.820 ± 0.076 | 13.7 |")
    assert "| 1.0310 ± 0.0021 | 1.5 ± 0.3% |" in rows[2]


def test_markdown_of_a_manifest_without_error_bars() -> None:
    """A manifest written before the error bars: its numbers as before, a dash where a number was not recorded."""
    data = manifest()
    old_keys = set(fid(0, 0, 0, error_bars=False))
    for entry in data["files"]:
        entry["fidelity"] = {k: v for k, v in entry["fidelity"].items() if k in old_keys}
    rows = [ln for ln in report.render_markdown([typed(data)]).splitlines() if ln.startswith("| `tiny.")]
    # the PPL ratio is ppl / ppl_base, which old manifests hold; it has no error bar
    assert rows[0] == "| `tiny.q8_0.gguf` | Q8_0 | 2.0 MB | ≈8.50 | 0.0029 | — | 0.9983 | 92.0% | 812.2 | 95.5 |"
    assert "±" not in "".join(rows)


def test_markdown_without_fidelity_and_several_models() -> None:
    md = report.render_markdown([typed(manifest()), typed(manifest(None, with_fidelity=False))])
    assert md.count("### tiny") == 2 and "### tiny\n" in md
    assert "FIDELITY was off" in md
    assert "| `tiny.q4_k_m.gguf` | Q4_K_M | 1.2 MB | ≈4.89 | — | — | — | — | — | — |" in md


def test_bits_per_weight_measured_from_the_gguf(tmp_path: Path) -> None:
    data = manifest()
    write_tiny_gguf(tmp_path / "tiny.q8_0.gguf", rows=8)
    md = report.render_markdown([typed(data, tmp_path)])  # read from tmp_path: the GGUFs are next to it
    assert "| Q8_0 | 2.0 MB | 32.00 |" in md  # an F32 tensor: 32 bits per weight, measured
    data["files"][1]["bpw"] = 4.91
    # recorded in the manifest
    assert "| Q4_K_M | 1.2 MB | 4.91 |" in report.render_markdown([typed(data, tmp_path)])


def test_plot_is_a_png_with_one_point_per_precision(tmp_path: Path) -> None:
    data = typed(manifest())
    fig = report._figure(data)
    (ax,) = fig.axes
    offsets = ax.collections[0].get_offsets()
    assert len(offsets) == 3
    assert sorted(t.get_text() for t in ax.texts) == ["Q2_K", "Q4_K_M", "Q8_0"]
    assert ax.get_yscale() == "log"  # KLD spans almost three decades
    png = report.plot(data, tmp_path / "plots" / "tiny.png")
    assert png_size(png) == (800, 500)


def test_plot_handles_a_zero_kld_and_refuses_no_numbers(tmp_path: Path) -> None:
    data = manifest()
    data["files"][0]["fidelity"]["kld_mean"] = 0.0  # e.g. a kept F32 base judged against itself
    fig = report._figure(typed(data))
    assert fig.axes[0].get_yscale() == "symlog"
    assert len(fig.axes[0].collections[0].get_offsets()) == 3
    from cecai_converter.errors import UsageError

    with pytest.raises(UsageError, match="no fidelity numbers"):
        report.plot(typed(manifest(with_fidelity=False)), tmp_path / "x.png")


def test_command_prints_plots_and_writes_the_step_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = tmp_path / "outputs"
    write_manifest(outputs / "CPU_LLM_LLAMA", manifest())
    write_manifest(outputs / "GPU_LLM_LLAMA", manifest("GPU_LLM_LLAMA", with_fidelity=False))
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert main(["report", str(outputs), "--plot", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    assert "### tiny (CPU_LLM_LLAMA)" in captured.out and "### tiny (GPU_LLM_LLAMA)" in captured.out
    assert "GPU_LLM_LLAMA" in captured.err and "no plot" in captured.err
    written = summary.read_text(encoding="utf-8")
    assert written.startswith("# earlier step\n") and captured.out.strip() in written
    assert png_size(tmp_path / "plots" / "tiny.CPU_LLM_LLAMA.fidelity.png") == (800, 500)
    assert not (tmp_path / "plots" / "tiny.GPU_LLM_LLAMA.fidelity.png").exists()


def test_command_json_and_single_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    path = write_manifest(tmp_path / "o", manifest())
    assert main(["--format", "json", "report", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plots"] == [] and data["markdown"].startswith("### tiny")
    assert data["manifests"][0]["files"][0]["fidelity"]["kld_mean"] == 0.0029
    assert "_folder" not in data["manifests"][0]


def test_command_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no manifest.json under" in capsys.readouterr().err
    bad = write_manifest(tmp_path / "bad", {"schema": 2, "files": []})
    assert main(["report", str(bad)]) == 2
    assert "not a cecai-converter manifest" in capsys.readouterr().err
