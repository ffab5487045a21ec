"""`cecai-convert plan`: the GitHub matrix a batch file turns into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cecai_converter import cli
from cecai_converter.batch import load_batch
from cecai_converter.errors import ConfigError
from cecai_converter.pairs import PAIRS
from cecai_converter.plan import MAX_MATRIX_JOBS, build_matrix


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conversions.yaml"
    path.write_text(text, encoding="utf-8")
    return path


BATCH = """
defaults: {precisions: [Q8_0, Q4_K_M], pairs: [cpu, gpu, arm, agx-orin]}
runner-labels: {arm: [self-hosted, linux, ARM64, graviton]}
models:
  - repo: owner/tiny
    revision: 0123abcd
  - path: models/local-one
    pairs: [cpu]
    precisions: [Q5_K_M]
"""


def test_one_entry_per_model_and_pair_with_its_runner_labels(tmp_path):
    matrix = build_matrix(load_batch(write(tmp_path, BATCH)))
    entries = matrix["include"]
    assert [e["id"] for e in entries] == ["tiny-cpu", "tiny-gpu", "tiny-arm", "tiny-agx-orin", "local-one-cpu"]
    by_id = {e["id"]: e for e in entries}
    assert by_id["tiny-gpu"]["runner_labels"] == list(PAIRS["GPU_LLM_LLAMA"].runner_labels)
    assert by_id["tiny-agx-orin"]["runner_labels"] == ["self-hosted", "linux", "ARM64", "agx-orin"]
    assert by_id["tiny-arm"]["runner_labels"] == ["self-hosted", "linux", "ARM64", "graviton"]
    assert by_id["tiny-cpu"] == {
        "id": "tiny-cpu",
        "name": "tiny",
        "source": "hub",
        "model": "owner/tiny",
        "revision": "0123abcd",
        "pair": "CPU_LLM_LLAMA",
        "slug": "cpu",
        "precisions": "Q8_0 Q4_K_M",
        "runner_labels": ["self-hosted", "linux", "X64"],
    }
    assert by_id["local-one-cpu"]["revision"] == "" and by_id["local-one-cpu"]["source"] == "local"


def test_pair_filter(tmp_path):
    matrix = build_matrix(load_batch(write(tmp_path, BATCH)), ["AGX_ORIN_LLM_LLAMA"])
    assert [e["id"] for e in matrix["include"]] == ["tiny-agx-orin"]


def test_an_empty_plan_is_an_error(tmp_path):
    batch = load_batch(write(tmp_path, "models: [{repo: o/m, precisions: Q8_0, pairs: cpu}]"))
    with pytest.raises(ConfigError, match="the plan is empty"):
        build_matrix(batch, ["gpu"])


def test_the_256_job_limit(tmp_path):
    def batch_with(n_models: int) -> Path:
        models = "\n".join(f"  - repo: o/m{i}" for i in range(n_models))
        return write(tmp_path, f"defaults: {{precisions: Q8_0, pairs: [cpu, gpu, arm, agx-orin]}}\nmodels:\n{models}\n")

    assert len(build_matrix(load_batch(batch_with(64)))["include"]) == MAX_MATRIX_JOBS == 256
    with pytest.raises(ConfigError, match="260 jobs; a GitHub matrix runs at most 256") as info:
        build_matrix(load_batch(batch_with(65)))
    assert "--pair" in (info.value.hint or "")


def test_cli_prints_one_matrix_line_for_github_output(tmp_path, capsys):
    assert cli.main(["plan", str(write(tmp_path, BATCH))]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("matrix=")
    assert len(json.loads(out.removeprefix("matrix="))["include"]) == 5


def test_cli_json_format_and_pair_option(tmp_path, capsys):
    assert cli.main(["--format", "json", "plan", str(write(tmp_path, BATCH)), "--pair", "gpu"]) == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)["include"]] == ["tiny-gpu"]


def test_cli_validation_error_exit_code(tmp_path, capsys):
    assert cli.main(["plan", str(write(tmp_path, "modles: []"))]) == 2
    assert "Did you mean 'models'?" in capsys.readouterr().err
