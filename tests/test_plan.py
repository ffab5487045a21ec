"""`cecai-convert plan`: the make and check matrices a batch file turns into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cecai_converter import cli
from cecai_converter.batch import load_batch
from cecai_converter.errors import ConfigError
from cecai_converter.pairs import PAIRS
from cecai_converter.plan import MAX_MATRIX_JOBS, build_matrix, build_plan, fidelity_plan


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
        "make_id": "tiny",
        "backend": "docker",
        "image": "",
        "max_kld": "",
        "min_top1": "",
        "fidelity": "false",
    }
    assert by_id["local-one-cpu"]["revision"] == "" and by_id["local-one-cpu"]["source"] == "local"


def test_one_model_three_precisions_four_pairs_is_one_make_job_and_four_check_jobs(tmp_path):
    batch = load_batch(
        write(tmp_path, "models: [{repo: o/m, precisions: [Q8_0, Q5_K_M, Q4_K_M], pairs: [cpu, gpu, arm, agx-orin]}]")
    )
    plan = build_plan(batch)
    assert plan["make"]["include"] == [
        {
            "id": "m",
            "name": "m",
            "source": "hub",
            "model": "o/m",
            "revision": "",
            "precisions": "Q8_0 Q5_K_M Q4_K_M",
            "pairs": "CPU_LLM_LLAMA GPU_LLM_LLAMA ARM_LLM_LLAMA AGX_ORIN_LLM_LLAMA",
            "runner_labels": ["self-hosted", "linux", "X64"],
            "fidelity_on": "builder",
        }
    ]
    checks = plan["check"]["include"]
    assert [(c["id"], c["pair"], c["make_id"]) for c in checks] == [
        ("m-cpu", "CPU_LLM_LLAMA", "m"),
        ("m-gpu", "GPU_LLM_LLAMA", "m"),
        ("m-arm", "ARM_LLM_LLAMA", "m"),
        ("m-agx-orin", "AGX_ORIN_LLM_LLAMA", "m"),
    ]
    assert all(c["runner_labels"] == list(PAIRS[c["pair"]].runner_labels) for c in checks)


def test_builder_labels_and_check_settings(tmp_path):
    text = """
builder-labels: [self-hosted, linux, X64, big-disk]
check:
  backend: local
  max-kld: 0.02
  min-top1: 0.95
  gpu: {backend: docker, image: ghcr.io/me/conv:1-gpu}
models: [{repo: o/m, precisions: Q8_0, pairs: [cpu, gpu]}]
"""
    plan = build_plan(load_batch(write(tmp_path, text)))
    assert plan["make"]["include"][0]["runner_labels"] == ["self-hosted", "linux", "X64", "big-disk"]
    cpu, gpu = plan["check"]["include"]
    assert (cpu["backend"], cpu["image"]) == ("local", "")
    assert (gpu["backend"], gpu["image"]) == ("docker", "ghcr.io/me/conv:1-gpu")
    assert (cpu["max_kld"], cpu["min_top1"]) == ("0.02", "0.95")


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ("{backend: podman}", "expected docker or local"),
        ("{max-kld: -1}", "max-kld: expected a number between 0 and inf"),
        ("{min-top1: 2}", "min-top1: expected a number between 0 and 1"),
        ("{gpu: {imge: x}}", "Did you mean 'image'?"),
        ("{tpu: {backend: local}}", "unknown key 'tpu'"),
    ],
)
def test_bad_check_settings_are_refused(tmp_path, check, message):
    with pytest.raises(ConfigError, match=message):
        load_batch(write(tmp_path, f"check: {check}\nmodels: [{{repo: o/m, precisions: Q8_0, pairs: cpu}}]"))


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
    with pytest.raises(ConfigError, match="260 check jobs; a GitHub matrix runs at most 256") as info:
        build_matrix(load_batch(batch_with(65)))
    assert "--pair" in (info.value.hint or "")


def test_cli_prints_github_output_lines(tmp_path, capsys):
    assert cli.main(["plan", str(write(tmp_path, BATCH))]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert sorted(lines) == ["check", "make", "matrix"]
    assert len(json.loads(lines["make"])["include"]) == 2
    assert len(json.loads(lines["check"])["include"]) == 5
    assert lines["matrix"] == lines["check"]


def test_cli_json_format_and_pair_option(tmp_path, capsys):
    assert cli.main(["--format", "json", "plan", str(write(tmp_path, BATCH)), "--pair", "gpu"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(plan) == ["check", "make"]
    assert [e["id"] for e in plan["check"]["include"]] == ["tiny-gpu"]
    assert [e["id"] for e in plan["make"]["include"]] == ["tiny"]  # local-one has no GPU pair: not made


def test_cli_validation_error_exit_code(tmp_path, capsys):
    assert cli.main(["plan", str(write(tmp_path, "modles: []"))]) == 2
    assert "Did you mean 'models'?" in capsys.readouterr().err


def fidelity_jobs(plan: dict) -> tuple[dict[str, str], dict[str, str]]:
    """model -> its make job's fidelity_on; check id -> its check job's fidelity input."""
    make = {e["id"]: e["fidelity_on"] for e in plan["make"]["include"]}
    return make, {e["id"]: e["fidelity"] for e in plan["check"]["include"]}


FIDELITY_BATCH = """
defaults: {precisions: Q8_0, pairs: [cpu, arm, gpu, agx-orin], fidelity-on: auto}
models:
  - {repo: o/gpus}                                    # auto, GPU pairs: check, measured on the first GPU pair
  - {repo: o/cpus, pairs: [cpu, arm]}                 # auto, no GPU pair: builder
  - {repo: o/forced, pairs: [arm, cpu], fidelity-on: check}   # check without a GPU pair: the first pair measures
  - {repo: o/orin, pairs: [cpu, agx-orin, gpu]}       # the first GPU pair in the model's order
  - {repo: o/here, fidelity-on: builder}
"""


def test_fidelity_on_auto_measures_on_the_first_gpu_pair_and_only_there(tmp_path):
    plan = build_plan(load_batch(write(tmp_path, FIDELITY_BATCH)))
    make, check = fidelity_jobs(plan)
    assert make == {"gpus": "check", "cpus": "builder", "forced": "check", "orin": "check", "here": "builder"}
    measuring = sorted(job for job, fidelity in check.items() if fidelity == "true")
    assert measuring == ["forced-arm", "gpus-gpu", "orin-agx-orin"]
    # Exactly one measuring check job per model that leaves fidelity to the checks, none for the others.
    for model, where in make.items():
        jobs = [job for job in check if job.startswith(f"{model}-")]
        assert sum(check[job] == "true" for job in jobs) == (1 if where == "check" else 0), model
    assert set(check.values()) == {"true", "false"}  # never "auto": the plan names the one runtime


def test_fidelity_on_defaults_to_builder_and_no_check_job_measures(tmp_path):
    plan = build_plan(load_batch(write(tmp_path, BATCH)))
    make, check = fidelity_jobs(plan)
    assert set(make.values()) == {"builder"} and set(check.values()) == {"false"}


def test_fidelity_on_auto_follows_the_pairs_left_by_the_pair_filter(tmp_path):
    batch = load_batch(write(tmp_path, "models: [{repo: o/m, precisions: Q8_0, pairs: [cpu, gpu], fidelity-on: auto}]"))
    assert fidelity_jobs(build_plan(batch, ["cpu"])) == ({"m": "builder"}, {"m-cpu": "false"})
    assert fidelity_jobs(build_plan(batch, ["gpu"])) == ({"m": "check"}, {"m-gpu": "true"})
    assert fidelity_jobs(build_plan(batch)) == ({"m": "check"}, {"m-cpu": "false", "m-gpu": "true"})


def test_fidelity_plan_directly():
    cpu, gpu, arm, orin = (PAIRS[n] for n in ("CPU_LLM_LLAMA", "GPU_LLM_LLAMA", "ARM_LLM_LLAMA", "AGX_ORIN_LLM_LLAMA"))
    assert fidelity_plan("builder", [cpu, gpu]) == ("builder", None)
    assert fidelity_plan("auto", [cpu, arm]) == ("builder", None)
    assert fidelity_plan("auto", [arm, orin, gpu]) == ("check", orin)
    assert fidelity_plan("check", [arm, cpu]) == ("check", arm)
    assert fidelity_plan("check", [cpu, gpu]) == ("check", gpu)


def test_the_plan_output_carries_the_fidelity_keys(tmp_path, capsys):
    assert cli.main(["plan", str(write(tmp_path, FIDELITY_BATCH))]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    make = {e["id"]: e for e in json.loads(lines["make"])["include"]}
    check = {e["id"]: e for e in json.loads(lines["check"])["include"]}
    assert make["gpus"]["fidelity_on"] == "check" and check["gpus-gpu"]["fidelity"] == "true"
    assert check["gpus-cpu"]["fidelity"] == "false"
