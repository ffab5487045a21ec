"""Every bad input gets a clear message, a non-zero exit, no partial .gguf, and an untouched input folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ggufs_under, sigint_default, sigint_ignored, tree_digest


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def convert(cli, model: Path, outdir: Path, *extra: str):
    return cli("convert", model, "--precision", "Q4_K_M", "--outdir", outdir, "--no-fidelity", *extra)


def assert_clean_failure(result, outdir: Path, code: int, *phrases: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert ggufs_under(outdir) == []
    assert not list(outdir.rglob(".cecai-tmp-*")) if outdir.exists() else True


def test_missing_model_folder(cli, tmp_path):
    result = convert(cli, tmp_path / "nope" / "model", tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", 2, "neither a local folder nor a Hub repo id")


def test_missing_config_json(cli, model, tmp_path):
    (model / "config.json").unlink()
    assert_clean_failure(convert(cli, model, tmp_path / "out"), tmp_path / "out", 2, "has no config.json")


def test_truncated_weights(cli, model, tmp_path):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    before = tree_digest(model)
    result = convert(cli, model, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", 2, "model.safetensors is truncated or corrupt", "hint:")
    assert tree_digest(model) == before


def test_unsupported_architecture(cli, model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["TotallyNewForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    result = convert(cli, model, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", 2, "'TotallyNewForCausalLM' is not supported", "0.3.36")


@pytest.mark.slow
def test_unrecognised_bpe_pretokenizer_is_explained(cli, model_factory, tmp_path):
    model = model_factory("gpt2-bpe")
    before = tree_digest(model)
    result = convert(cli, model, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", 2, "does not recognise this model's BPE pre-tokenizer",
                         "copy that tokenizer's files unchanged")  # fmt: skip
    assert tree_digest(model) == before


def test_pickle_weights_refused_by_default(cli, model, tmp_path):
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    result = convert(cli, model, tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", 2, "only pickle weights", "--allow-pickle")


def test_imatrix_type_without_imatrix(cli, model, tmp_path):
    result = cli("convert", model, "--precision", "IQ2_XXS", "--outdir", tmp_path / "out", "--no-fidelity")
    assert_clean_failure(result, tmp_path / "out", 2, "IQ2_XXS need(s) an importance matrix", "--imatrix")


def test_unknown_precision_on_the_command_line(cli, model, tmp_path):
    result = cli("convert", model, "--precision", "Q4_KM", "--outdir", tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", 2, "unknown precision 'Q4_KM'", "Did you mean Q4_K_M?")


def test_yaml_syntax_error_through_run(cli, tmp_path):
    cfg = tmp_path / "Converter" / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text("MODEL_NAME: gpt2\n  bad: [\n")
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: F16\n")
    result = cli("run", tmp_path / "Converter")
    assert_clean_failure(result, tmp_path / "Converter", 2, "invalid YAML at line")


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow
def test_disk_full_fails_cleanly(cli, model, tmp_path):
    small = tmp_path / "small-disk"
    if not _can_mount_tmpfs(small):
        pytest.skip("needs root to mount a 3 MB tmpfs as a full disk")
    try:
        result = convert(cli, model, small / "out")  # the F32 base alone is ~7 MB
        assert_clean_failure(result, small / "out", 1, "disk")
        assert "free space" in result.stderr
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_run_removes_temporary_files_and_next_run_starts_clean(model, tmp_path, cli, sig):
    outdir = tmp_path / "out"
    argv = ["convert", str(model), "--precision", "Q8_0", "--precision", "Q4_K_M", "--outdir", str(outdir)]
    # Started as under `./dev test &` (SIGINT ignored, and inherited): the child gets SIGINT's default back.
    with sigint_ignored():
        proc = subprocess.Popen(
            [sys.executable, "-m", "cecai_converter", *argv, "--no-fidelity"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=sigint_default,
        )
    deadline = time.monotonic() + 120
    while not list(outdir.glob(".cecai-tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(outdir.glob(".cecai-tmp-*")), "the run never started staging"
    time.sleep(1.0)  # inside the converter child by now
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert ggufs_under(outdir) == []
    assert not list(outdir.glob(".cecai-tmp-*"))
    again = convert(cli, model, outdir)
    assert again.returncode == 0, again.stderr
    assert (outdir / "model.q4_k_m.gguf").is_file()
