"""`cecai-convert check`: files made once, checked on a pair's runtime against the builder's reference.

Real conversions of a small model, real llama-cpp-python loads. The runtimes that disagree are made by giving a
file another file's predictions as its reference (what a miscompiled kernel would look like from the outside): no
second runtime of another kind runs on this machine.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult, engine, tree_digest

from cecai_converter.agreement import N_POSITIONS, REFERENCE_NAME, TOP_K, read_reference
from cecai_converter.check import Limits
from cecai_converter.errors import ConfigError, UsageError
from cecai_converter.pairs import PAIRS
from cecai_converter.records import record_name


@pytest.fixture(scope="module")
def made(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A builder's outputs folder: `convert` of the tiny model to Q8_0 and Q4_K_M (reference.json included)."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("made") / "out"
    result = run_cli("convert", tiny_llama, "--precision", "Q8_0", "--precision", "Q4_K_M", "--outdir", out,
                     "--model-name", "tiny", "--no-fidelity")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def copy_of(made: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "files"
    shutil.copytree(made, dest)
    return dest


def record_of(folder: Path, pair: str = "CPU_LLM_LLAMA") -> dict:
    return json.loads((folder / record_name("tiny", PAIRS[pair])).read_text())


@pytest.mark.slow
def test_convert_writes_a_reference_for_every_file(made: Path) -> None:
    reference = read_reference(made / REFERENCE_NAME)
    manifest = json.loads((made / "manifest.json").read_text())
    assert sorted(reference["files"]) == sorted(f["name"] for f in manifest["files"])
    assert 8 <= len(reference["tokens"]) <= N_POSITIONS
    for entry in manifest["files"]:
        ref = reference["files"][entry["name"]]
        assert ref["sha256"] == entry["sha256"]
        assert len(ref["ids"]) == len(reference["tokens"]) and all(len(row) == TOP_K for row in ref["ids"])
        # log-probabilities of the most likely tokens, in decreasing order
        assert all(row == sorted(row, reverse=True) and row[0] <= 0 for row in ref["logprobs"])
    assert reference["runtime"]["device"] == "cpu" and reference["runtime"]["machine"]


@pytest.mark.slow
def test_same_runtime_agrees_exactly_and_records_everything(
    made: Path, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    files = copy_of(made, tmp_path)
    before = tree_digest(made)
    result = cli("--format", "json", "check", files, "--pair", "cpu")
    assert result.returncode == 0, result.stderr
    record = record_of(files)
    assert json.loads(result.stdout)["passed"] is True and record["passed"] is True
    assert record["pair"] == "CPU_LLM_LLAMA" and record["runtime"]["device"] == "cpu"
    assert record["runtime"]["backend"] == "local" and record["limits"] == Limits().as_dict()
    assert len(record["files"]) == 2
    for row in record["files"]:
        agr = row["agreement"]
        assert row["sha256_match"] and row["generated_tokens"] > 0
        # one build of llama.cpp on one machine: the same numbers, up to the 6 decimals the reference keeps
        assert agr["kld_mean"] < 1e-5 and agr["top1_agreement"] == 1.0
        assert agr["prompt_tps"] > 0 and agr["gen_tps"] > 0 and agr["peak_rss_mib"] > 10
        assert agr["offloaded_layers"] == 0 and agr["total_layers"] >= 2
    assert tree_digest(made) == before  # the builder's files were not touched


@pytest.mark.slow
def test_a_runtime_that_disagrees_fails_with_the_file_the_pair_and_the_numbers(
    made: Path, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    files = copy_of(made, tmp_path)
    ref = json.loads((files / REFERENCE_NAME).read_text())
    q8, q4 = "tiny.q8_0.gguf", "tiny.q4_k_m.gguf"
    # The Q4_K_M file's reference now holds what the Q8_0 file predicts (its own sha256 kept).
    ref["files"][q4] = {**ref["files"][q8], "sha256": ref["files"][q4]["sha256"]}
    (files / REFERENCE_NAME).write_text(json.dumps(ref))
    result = cli("check", files, "--pair", "CPU_LLM_LLAMA", "--max-kld", "0.0001")
    assert result.returncode == 1, result.stderr
    assert f"CPU_LLM_LLAMA: {q4}: KL-divergence against the builder's runtime" in result.stderr
    assert "above max_kld 0.0001" in result.stderr
    record = record_of(files)
    rows = {r["name"]: r for r in record["files"]}
    assert record["passed"] is False and rows[q8]["passed"] is True and rows[q4]["passed"] is False
    assert rows[q4]["agreement"]["kld_mean"] > 0.0001


@pytest.mark.slow
def test_altered_bytes_fail_the_check(made: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    files = copy_of(made, tmp_path)
    target = files / "tiny.q8_0.gguf"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF  # a tensor byte: the file still loads
    target.write_bytes(bytes(data))
    result = cli("check", files, "--pair", "cpu")
    assert result.returncode == 1
    assert "tiny.q8_0.gguf: sha256" in result.stderr and "other bytes than the ones made and measured" in result.stderr
    assert record_of(files)["files"][0]["sha256_match"] is False


@pytest.mark.slow
def test_a_gpu_pair_on_a_cpu_only_runtime_fails_instead_of_checking_the_cpu(
    made: Path, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python can offload to a GPU")
    files = copy_of(made, tmp_path)
    result = cli("check", files, "--pair", "gpu")
    assert result.returncode == 1
    assert "GPU_LLM_LLAMA is a GPU pair but this llama-cpp-python cannot offload" in result.stderr
    assert record_of(files, "GPU_LLM_LLAMA")["passed"] is False
    # Checking it on the CPU on purpose is possible, and the record says so.
    result = cli("check", files, "--pair", "gpu", "--n-gpu-layers", "0")
    assert result.returncode == 0, result.stderr
    record = record_of(files, "GPU_LLM_LLAMA")
    assert record["passed"] and record["runtime"]["device"] == "cpu" and record["runtime"]["n_gpu_layers"] == 0


@pytest.mark.slow
def test_a_folder_without_a_reference_or_manifest_is_refused(
    made: Path, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    files = copy_of(made, tmp_path)
    (files / REFERENCE_NAME).unlink()
    result = cli("check", files, "--pair", "cpu")
    assert result.returncode == 2 and "no runtime reference" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("check", empty, "--pair", "cpu")
    assert result.returncode == 2 and "no manifest.json" in result.stderr


def test_limits_are_checked() -> None:
    assert Limits.parse(None, None) == Limits()
    with pytest.raises(UsageError, match="--max-kld"):
        Limits.parse(-1, None)
    with pytest.raises(UsageError, match="--min-top1"):
        Limits.parse(None, 1.5)


def test_a_damaged_reference_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / REFERENCE_NAME
    path.write_text('{"schema": 1, "tokens": [1, 2], "files": {"a.gguf": {"ids": [[1]], "logprobs": [[0]]}}}')
    with pytest.raises(ConfigError, match="does not have one row per token"):
        read_reference(path)
    path.write_text("[]")
    with pytest.raises(ConfigError, match="not a cecai-converter runtime reference"):
        read_reference(path)


@pytest.mark.slow
def test_an_up_to_date_rerun_keeps_the_reference(made: Path, tiny_llama: Path, cli: Callable[..., CliResult]) -> None:
    before = (made / REFERENCE_NAME).read_bytes()
    result = cli("convert", tiny_llama, "--precision", "Q8_0", "--precision", "Q4_K_M", "--outdir", made,
                 "--model-name", "tiny", "--no-fidelity")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stderr
    assert (made / REFERENCE_NAME).read_bytes() == before


@pytest.mark.slow
def test_a_run_without_a_reference_removes_one_of_other_bytes(
    made: Path, tmp_path: Path, cli: Callable[..., CliResult], model_factory: Callable[..., Path]
) -> None:
    files = copy_of(made, tmp_path)
    other = model_factory("llama", seed=1)  # other weights: other bytes under the same file name
    result = cli("convert", other, "--precision", "Q8_0", "--outdir", files, "--model-name", "tiny",
                 "--no-fidelity", "--no-reference")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (files / REFERENCE_NAME).exists()
    result = cli("check", files, "--pair", "cpu")
    assert result.returncode == 2 and "no runtime reference" in result.stderr


@pytest.mark.slow
@pytest.mark.engine
@engine
def test_check_in_the_cpu_image_keeps_the_files_read_only_and_writes_the_record_beside_them(
    made: Path, tmp_path: Path, cli: Callable[..., CliResult], cpu_image: str
) -> None:
    files = copy_of(made, tmp_path)
    before = tree_digest(files)
    result = cli("check", files, "--pair", "cpu", "--backend", "docker", "--image", cpu_image)
    assert result.returncode == 0, result.stderr
    record = record_of(files)
    assert record["passed"] and record["runtime"]["backend"] == "docker" and record["runtime"]["image"] == cpu_image
    assert all(row["agreement"]["top1_agreement"] == 1.0 for row in record["files"])
    after = tree_digest(files)
    assert after.pop(record_name("tiny", PAIRS["CPU_LLM_LLAMA"])) and after == before
