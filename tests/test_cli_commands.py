"""The small commands (`precisions`, `toolchain`, `verify`) and the CLI's error boundary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cecai_converter.cli import main
from cecai_converter.errors import VerificationFailed
from cecai_converter.pipeline import checks
from cecai_converter.runtime import installed_runtime_version
from cecai_converter.toolchain import LLAMA_CPP_PYTHON_VERSION

ROOT = Path(__file__).resolve().parents[1]


def test_precisions_json_lists_the_table(cli):
    result = cli("precisions", "--format", "json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert {"Q4_K_M", "IQ2_XXS", "F16"} <= {r["name"] for r in rows}
    assert next(r for r in rows if r["name"] == "IQ2_XXS")["needs_imatrix"] is True


def test_one_pin_everywhere():
    pins = re.findall(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [LLAMA_CPP_PYTHON_VERSION]
    assert installed_runtime_version() == LLAMA_CPP_PYTHON_VERSION


def test_toolchain_reports_the_pin_and_the_converter(cli):
    result = cli("toolchain", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["llama_cpp_python"] == LLAMA_CPP_PYTHON_VERSION
    assert data["runtime_installed"] == LLAMA_CPP_PYTHON_VERSION
    assert (Path(data["converter_dir"]) / "convert_hf_to_gguf.py").is_file()


@pytest.mark.slow
def test_verify_passes_good_files_and_fails_damaged_ones(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", out, "--no-fidelity").returncode == 0
    good = out / "model.q8_0.gguf" if (out / "model.q8_0.gguf").exists() else next(out.glob("*.gguf"))
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    ok = cli("verify", good)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"ok\s+.*llama Q8_0 \d+ tensors, generated 8 tokens", ok.stdout)
    bad = cli("verify", good, damaged)
    assert bad.returncode == 1  # a GGUF that fails verification
    assert bad.stdout.count("FAIL") == 1
    bad = cli("verify", good, damaged, not_gguf)
    assert bad.returncode == 2  # and a path that is no GGUF at all: bad input, every row still printed
    assert bad.stdout.count("FAIL") == 2


@pytest.mark.slow
def test_a_file_that_fails_verification_is_never_published(tiny_llama, tmp_path, monkeypatch, capsys):
    """The runtime check is replaced by one that fails (the stand-in is ours: real files never fail it here)."""

    def failing_load_check_many(paths, **kwargs):
        raise VerificationFailed(f"llama-cpp-python could not load {paths[0].name}")

    monkeypatch.setattr(checks, "load_check_many", failing_load_check_many)
    code = main(["convert", str(tiny_llama), "--precision", "Q4_K_M", "--outdir", str(tmp_path), "--no-fidelity"])
    assert code == 1
    assert "could not load" in capsys.readouterr().err
    assert list(tmp_path.rglob("*.gguf")) == []
    assert not list(tmp_path.glob(".cecai-tmp-*"))


def test_usage_errors_exit_2_without_traceback(cli, tmp_path):
    result = cli("run", tmp_path / "missing")
    assert result.returncode == 2
    assert "Converter folder not found" in result.stderr and "Traceback" not in result.stderr
