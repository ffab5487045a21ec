"""Model folder checks and fingerprints, on real model folders built by the tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cecai_converter.errors import UnsupportedModel, UsageError
from cecai_converter.source import (
    check_model_dir,
    fingerprint_files,
    looks_like_repo_id,
    source_dtype,
    supported_architectures,
)
from cecai_converter.toolchain import ensure_converter


@pytest.fixture
def model_copy(tiny_llama: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def test_a_good_folder_is_described(tiny_llama):
    source = check_model_dir(tiny_llama, ensure_converter())
    assert source.architecture == "LlamaForCausalLM"
    assert source.weights == ("model.safetensors",)
    assert source_dtype(source) == "f32"


def test_bf16_checkpoints_keep_bf16(model_factory):
    assert source_dtype(check_model_dir(model_factory("llama", dtype="bfloat16"))) == "bf16"


def test_supported_architectures_are_read_without_importing_the_converter():
    names = supported_architectures(ensure_converter())
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel"} <= names


def test_missing_folder_and_config(tmp_path, model_copy):
    with pytest.raises(UsageError, match="model folder not found"):
        check_model_dir(tmp_path / "absent")
    (model_copy / "config.json").unlink()
    with pytest.raises(UsageError, match=r"has no config\.json"):
        check_model_dir(model_copy)


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="holds no weights"):
        check_model_dir(model_copy)


def test_truncated_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UsageError, match="truncated or corrupt") as info:
        check_model_dir(model_copy)
    assert "download or copy it again" in info.value.hint


def test_corrupt_safetensors_header(model_copy):
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10:20] = b"\xff" * 10
    weights.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="truncated or corrupt"):
        check_model_dir(model_copy)


def test_pickle_only_weights_are_refused_unless_allowed(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(UnsupportedModel, match="pickle") as info:
        check_model_dir(model_copy)
    assert "--allow-pickle" in info.value.hint
    assert check_model_dir(model_copy, allow_pickle=True).pickle is True


def test_unsupported_architecture_names_the_pinned_version(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLMv9"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel) as info:
        check_model_dir(model_copy, ensure_converter())
    assert "llama-cpp-python 0.3.36" in info.value.message
    assert "LlamaForCausalLM" in info.value.message  # the close match


def test_missing_shard_named_by_the_index(model_copy):
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(UsageError, match="shards that are missing"):
        check_model_dir(model_copy)


def test_fingerprint_is_content_based_and_reuses_unchanged_hashes(model_copy):
    fp1, files = fingerprint_files(model_copy)
    os.utime(model_copy / "config.json")  # same content, new mtime
    fp2, _ = fingerprint_files(model_copy, {f["path"]: f for f in files})
    assert fp1 == fp2
    # A recorded hash is reused (not recomputed) while size and mtime match: a planted hash shows through…
    fake = {f["path"]: {**f, "sha256": "0" * 64} for f in files}
    assert fingerprint_files(model_copy, fake)[0] != fp1
    # …and a real change is seen.
    (model_copy / "tokenizer_config.json").write_text("{}")
    assert fingerprint_files(model_copy, {f["path"]: f for f in files})[0] != fp1


@pytest.mark.parametrize(("value", "expected"), [("openai/gpt2", True), ("gpt2", False), ("./a/b", False)])
def test_repo_id_detection(value, expected):
    assert looks_like_repo_id(value) is expected
