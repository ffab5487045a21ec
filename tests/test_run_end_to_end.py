"""The seed layout end to end through the CLI: several pairs, shared work, no-work re-runs, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ggufs_under, tree_digest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seed(tmp_path_factory, tiny_llama) -> Path:
    """A GPT_2/Converter folder in the established layout, CPU and ARM pairs with different precisions."""
    root = tmp_path_factory.mktemp("seed") / "GPT_2"
    conv = root / "Converter"
    cfg = conv / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "ARM_LLM_LLAMA").mkdir()
    general = {
        "IMAGE_NAME": "x", "MODEL_NAME": "gpt2", "TRAINED": False,
        "MODELS_PATH": "../models", "LOGS_PATH": "../logs", "OUTPUTS_PATH": "../outputs",
    }  # fmt: skip
    (cfg / "converter_args.yaml").write_text(yaml.safe_dump(general))
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: [Q8_0, Q4_K_M]\n")
    (cfg / "ARM_LLM_LLAMA" / "converter_args_arm_llm_llama.yaml").write_text("PRECISION: [Q4_K_M, FP16]\n")
    shutil.copytree(tiny_llama, conv / "models" / "gpt2")
    return conv


@pytest.fixture(scope="module")
def first_run(seed, cli):
    before = tree_digest(seed / "models")
    result = cli("run", seed, "--no-fidelity", "--format", "json")
    assert result.returncode == 0, result.stderr
    return before, result


def test_each_pair_gets_its_files_manifest_and_log(seed, first_run):
    _, result = first_run
    data = json.loads(result.stdout)
    pairs = {r["pair"]: r for r in data["results"]}
    assert set(pairs) == {"CPU_LLM_LLAMA", "ARM_LLM_LLAMA"}
    cpu = sorted(p.name for p in (seed / "outputs" / "CPU_LLM_LLAMA").glob("*.gguf"))
    arm = sorted(p.name for p in (seed / "outputs" / "ARM_LLM_LLAMA").glob("*.gguf"))
    assert cpu == ["gpt2.q4_k_m.gguf", "gpt2.q8_0.gguf"]
    assert arm == ["gpt2.f16.gguf", "gpt2.q4_k_m.gguf"]
    for pair in pairs:
        log = seed / "logs" / pair / f"Converter_{pair}_gpt2.log"
        assert "convert_hf_to_gguf" in log.read_text() or "hf-to-gguf" in log.read_text()
        manifest = json.loads((seed / "outputs" / pair / "manifest.json").read_text())
        assert manifest["pair"] == pair
        assert manifest["source"]["kind"] == "local"
        assert all(f["verification"]["generated_tokens"] for f in manifest["files"])


def test_the_model_is_converted_once_and_q4_k_m_quantized_once(seed, first_run):
    _, result = first_run
    assert result.stderr.count("converting LlamaForCausalLM") == 1
    assert result.stderr.count("quantizing to Q4_K_M") == 1
    cpu = seed / "outputs" / "CPU_LLM_LLAMA" / "gpt2.q4_k_m.gguf"
    arm = seed / "outputs" / "ARM_LLM_LLAMA" / "gpt2.q4_k_m.gguf"
    assert cpu.read_bytes() == arm.read_bytes()


def test_inputs_are_untouched_and_nothing_temporary_is_left(seed, first_run):
    before, _ = first_run
    assert tree_digest(seed / "models") == before
    assert [p for p in ggufs_under(seed) if p.name.startswith(".")] == []
    assert not list((seed / "outputs").rglob(".cecai-tmp-*"))


def test_unchanged_rerun_does_no_work_and_says_so(seed, first_run, cli):
    mtimes = {p: p.stat().st_mtime_ns for p in ggufs_under(seed / "outputs")}
    result = cli("run", seed, "--no-fidelity")
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stderr
    assert "converting" not in result.stderr and "quantizing" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in ggufs_under(seed / "outputs")} == mtimes


def test_a_new_precision_reuses_the_others(seed, first_run, cli, tmp_path):
    pair_file = seed / "configurations" / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml"
    original = pair_file.read_text()
    try:
        pair_file.write_text("PRECISION: [Q8_0, Q4_K_M, Q6_K]\n")
        result = cli("run", seed, "--pair", "cpu", "--no-fidelity")
        assert result.returncode == 0, result.stderr
        assert "quantizing to Q6_K" in result.stderr
        assert "quantizing to Q8_0" not in result.stderr and "quantizing to Q4_K_M" not in result.stderr
        assert (seed / "outputs" / "CPU_LLM_LLAMA" / "gpt2.q6_k.gguf").is_file()
    finally:
        pair_file.write_text(original)


def test_force_redoes_and_produces_identical_bytes(seed, first_run, cli):
    target = seed / "outputs" / "CPU_LLM_LLAMA" / "gpt2.q4_k_m.gguf"
    before = target.read_bytes()
    result = cli("run", seed, "--pair", "CPU_LLM_LLAMA", "--force", "--no-fidelity")
    assert result.returncode == 0, result.stderr
    assert "converting LlamaForCausalLM" in result.stderr
    assert target.read_bytes() == before


def test_two_runs_in_different_folders_give_identical_files(tiny_llama, tmp_path, cli):
    digests = []
    for name in ("a", "b"):
        result = cli("convert", tiny_llama, "--precision", "Q4_K_M", "--precision", "Q8_0", "--outdir",
                     tmp_path / name, "--model-name", "same", "--no-fidelity")  # fmt: skip
        assert result.returncode == 0, result.stderr
        digests.append(tree_digest(tmp_path / name))
    gguf_a = {k: v for k, v in digests[0].items() if k.endswith(".gguf")}
    gguf_b = {k: v for k, v in digests[1].items() if k.endswith(".gguf")}
    assert gguf_a == gguf_b and len(gguf_a) == 2


def test_bf16_source_keeps_a_bf16_base(model_factory, tmp_path, cli):
    model = model_factory("llama", dtype="bfloat16")
    result = cli("convert", model, "--precision", "Q4_K_M", "--outdir", tmp_path, "--keep-base", "--no-fidelity",
                 "--format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = sorted(f["precision"] for f in json.loads(result.stdout)["files"])
    assert names == ["BF16", "Q4_K_M"]
