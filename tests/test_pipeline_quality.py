"""Fidelity and importance matrices through the whole pipeline (CLI, Converter folder, manifest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ggufs_under

pytestmark = pytest.mark.slow


def test_every_conversion_reports_fidelity_by_default(cli, tiny_llama, tmp_path):
    result = cli("convert", tiny_llama, "--precision", "Q8_0", "--precision", "Q2_K", "--outdir", tmp_path,
                 "--format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads(Path(json.loads(result.stdout)["manifest"]).read_text())
    fid = {f["precision"]: f["fidelity"] for f in manifest["files"]}
    assert fid["Q8_0"]["kld_mean"] < fid["Q2_K"]["kld_mean"]
    assert fid["Q8_0"]["device"] == "cpu" and fid["Q8_0"]["n_tokens"] > 500
    report = cli("report", tmp_path, "--plot", tmp_path / "plots")
    assert report.returncode == 0, report.stderr
    assert "Q2_K" in report.stdout and "|" in report.stdout
    assert list((tmp_path / "plots").glob("*.png"))


def test_iq_type_with_a_computed_imatrix_is_made_verified_and_recorded(cli, tiny_llama, tmp_path):
    result = cli("convert", tiny_llama, "--precision", "IQ2_XXS", "--outdir", tmp_path, "--imatrix", "auto",
                 "--format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads(Path(json.loads(result.stdout)["manifest"]).read_text())
    (entry,) = manifest["files"]
    assert entry["precision"] == "IQ2_XXS" and entry["file_type"] == 19
    assert entry["verification"]["generated_tokens"]
    assert manifest["imatrix"]["source"] == "computed" and manifest["imatrix"]["entries"] > 0
    # the computed matrix is published beside the files, ready to be given back as --imatrix FILE
    kept = tmp_path / manifest["imatrix"]["file"]
    assert kept.is_file() and manifest["imatrix"]["file"].endswith(".imatrix.gguf")
    again = cli("convert", tiny_llama, "--precision", "IQ2_XXS", "--outdir", tmp_path / "again", "--imatrix", kept,
                "--no-fidelity")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / entry["name"]).read_bytes() == (tmp_path / entry["name"]).read_bytes()
    assert "llama-imatrix" in result.stderr


def test_thresholds_in_the_configuration_fail_the_run_and_publish_nothing(cli, tiny_llama, tmp_path):
    conv = tmp_path / "Converter"
    cfg = conv / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text(yaml.safe_dump({"MODEL_NAME": "m"}))
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text(
        yaml.safe_dump({"PRECISION": ["Q8_0", "Q2_K"], "THRESHOLDS": {"Q2_K": {"max_kld": 1e-9}}})
    )
    shutil.copytree(tiny_llama, conv / "models" / "m")
    result = cli("run", conv)
    assert result.returncode == 1
    assert "fidelity thresholds exceeded" in result.stderr and "Q2_K" in result.stderr
    assert ggufs_under(conv / "outputs") == []


def test_each_runtime_verifies_and_measures_the_shared_files_itself(tiny_llama, tmp_path):
    """Two targets of one job on different runtimes (n_gpu_layers 0 and -1): the files are made once, and each
    runtime loads and measures them. On a CPU build -1 still runs on the CPU, so this checks the grouping and what
    each manifest records; tests/test_gpu_runtime.py checks the offload itself on a GPU."""
    import dataclasses
    import io

    from cecai_converter.output import Output
    from cecai_converter.pairs import PAIRS
    from cecai_converter.pipeline import Job, Target, run_job
    from cecai_converter.precisions import parse_precisions
    from cecai_converter.request_options import Options

    cpu, gpu = tmp_path / "outputs" / "CPU_LLM_LLAMA", tmp_path / "outputs" / "GPU_LLM_LLAMA"
    err = io.StringIO()
    job = Job(
        model=str(tiny_llama),
        model_name="m",
        precisions=parse_precisions(["Q8_0", "Q4_K_M"]),
        targets=(
            Target(cpu, PAIRS["CPU_LLM_LLAMA"], n_gpu_layers=0),
            Target(gpu, PAIRS["GPU_LLM_LLAMA"], n_gpu_layers=-1),
        ),
        options=Options(fidelity=True),
    )
    manifests = [m.to_dict() for m in run_job(job, Output(stderr=err))]
    by_pair = {m["pair"]: m for m in manifests}
    assert by_pair["CPU_LLM_LLAMA"]["runtime"] == {"n_gpu_layers": 0}
    assert by_pair["GPU_LLM_LLAMA"]["runtime"] == {"n_gpu_layers": -1}
    timings = by_pair["GPU_LLM_LLAMA"]["timings"]
    # each runtime loads the files once, for their verification and fidelity together (fidelity's worker)
    assert set(timings["fidelity_s"]) == {"n_gpu_layers=0", "n_gpu_layers=-1"} and timings["verify_s"] == {}
    assert set(timings["quantize_s"]) == {"Q8_0", "Q4_K_M"}  # made once for both
    assert err.getvalue().count("measuring fidelity") == 2 and "n_gpu_layers=-1" in err.getvalue()
    assert "verifying" not in err.getvalue()
    for manifest in manifests:
        assert all(f["verification"]["generated_tokens"] and f["fidelity"]["n_tokens"] > 0 for f in manifest["files"])
    assert {f["sha256"] for f in by_pair["CPU_LLM_LLAMA"]["files"]} == {
        f["sha256"] for f in by_pair["GPU_LLM_LLAMA"]["files"]
    }

    # Another runtime setting for a target is not "up to date": its files are reused, its manifest is rewritten.
    err = io.StringIO()
    cpu_only = dataclasses.replace(job, targets=(job.targets[0], dataclasses.replace(job.targets[1], n_gpu_layers=0)))
    again = [m.to_dict() for m in run_job(cpu_only, Output(stderr=err))]
    assert "up to date" not in err.getvalue() and "quantizing" not in err.getvalue()
    assert [m["runtime"]["n_gpu_layers"] for m in again] == [0, 0]
    assert all(f["reused"] for m in again for f in m["files"])
    # and the same setting once more is
    err = io.StringIO()
    run_job(cpu_only, Output(stderr=err))
    assert "up to date" in err.getvalue()
