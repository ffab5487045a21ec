"""The batch file format (conversions.yaml): what it accepts and how it says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from cecai_converter.batch import load_batch
from cecai_converter.errors import ConfigError
from cecai_converter.pairs import PAIRS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conversions.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conversions.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_example_is_valid():
    batch = load_batch(EXAMPLE)
    assert [m.name for m in batch.models] == ["smollm2-135m-instruct", "my-finetune"]
    assert batch.models[0].source == "hub" and batch.models[1].source == "local"


def test_defaults_apply_and_models_override_them(tmp_path):
    batch = load_batch(
        write(
            tmp_path,
            """
defaults: {precisions: [q8_0, Q4_K], pairs: [cpu]}
models:
  - repo: owner/Tiny-Model
    revision: abc123
  - path: models/mine
    precisions: Q5_K_M
    pairs: [GPU_LLM_LLAMA, agx-orin]
""",
        )
    )
    first, second = batch.models
    assert first.name == "Tiny-Model" and first.revision == "abc123"
    assert [p.name for p in first.precisions] == ["Q8_0", "Q4_K_M"]
    assert [p.name for p in first.pairs] == ["CPU_LLM_LLAMA"]
    assert second.name == "mine" and second.model.endswith("models/mine")
    assert [p.name for p in second.precisions] == ["Q5_K_M"]
    assert [p.name for p in second.pairs] == ["GPU_LLM_LLAMA", "AGX_ORIN_LLM_LLAMA"]
    assert batch.runner_labels == {n: p.runner_labels for n, p in PAIRS.items()}


def test_runner_labels_override_one_pair(tmp_path):
    batch = load_batch(
        write(
            tmp_path,
            """
runner-labels: {gpu: [self-hosted, linux, X64, gpu, a100]}
models: [{repo: o/m, precisions: Q8_0, pairs: gpu}]
""",
        )
    )
    assert batch.runner_labels["GPU_LLM_LLAMA"] == ("self-hosted", "linux", "X64", "gpu", "a100")
    assert batch.runner_labels["CPU_LLM_LLAMA"] == PAIRS["CPU_LLM_LLAMA"].runner_labels


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modles: []", r"unknown key 'modles'. Did you mean 'models'\?"),
        ("models: [{repo: o/m, precision: Q8_0, pairs: cpu}]", r"unknown key 'precision'. Did you mean 'precisions'\?"),
        ("defaults: {pair: cpu}\nmodels: [{repo: o/m}]", r"defaults: unknown key 'pair'. Did you mean 'pairs'\?"),
        ("models: []", "`models` must be a non-empty list"),
        ("models: [{repo: o/m, path: x, precisions: Q8_0, pairs: cpu}]", "exactly one of `repo`"),
        ("models: [{repo: not-a-repo-id, precisions: Q8_0, pairs: cpu}]", "is not a repo id"),
        ("models: [{path: ../outside, precisions: Q8_0, pairs: cpu}]", "must be a folder inside the repository"),
        ("models: [{path: m, revision: main, precisions: Q8_0, pairs: cpu}]", "applies to `repo` models only"),
        ("models: [{repo: o/m, pairs: cpu}]", "no precisions"),
        ("models: [{repo: o/m, precisions: Q8_0}]", "no pairs"),
        (
            "models: [{repo: o/m, precisions: Q4_K_MM, pairs: cpu}]",
            r"unknown precision 'Q4_K_MM'. Did you mean Q4_K_M\?",
        ),
        ("models: [{repo: o/m, precisions: Q8_0, pairs: GPU_LLM_LAMA}]", r"Did you mean GPU_LLM_LLAMA\?"),
        ("models: [{repo: o/m, name: 'bad name', precisions: Q8_0, pairs: cpu}]", "cannot be a file name stem"),
        (
            "defaults: {precisions: Q8_0, pairs: cpu}\nmodels: [{repo: a/m}, {repo: b/m}]",
            "both named 'm'",
        ),
        ("runner-labels: {gpu: []}\nmodels: [{repo: o/m, precisions: Q8_0, pairs: cpu}]", "non-empty list of runner"),
        ("runner-labels: {tpu: [x]}\nmodels: [{repo: o/m, precisions: Q8_0, pairs: cpu}]", "unknown pair 'tpu'"),
        ("version: 2\nmodels: [{repo: o/m, precisions: Q8_0, pairs: cpu}]", "version 2 is not supported"),
        ("models: [{repo: o/m, precisions: Q8_0, pairs: cpu}", "invalid YAML at line"),
        ("- a list", "expected `KEY: value` lines"),
        (
            "models: [{repo: o/m, precisions: Q8_0, pairs: cpu, fidelity-on: gpu}]",
            r"models\[0\]\.fidelity-on: expected builder, check or auto, got 'gpu'",
        ),
        (
            "defaults: {fidelity-on: true}\nmodels: [{repo: o/m, precisions: Q8_0, pairs: cpu}]",
            "defaults.fidelity-on: expected builder, check or auto, got True",
        ),
        (
            "models: [{repo: o/m, precisions: Q8_0, pairs: cpu, fidelity_on: check}]",
            r"unknown key 'fidelity_on'. Did you mean 'fidelity-on'\?",
        ),
    ],
)
def test_mistakes_are_reported_clearly(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_batch(write(tmp_path, text))


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="missing configuration file"):
        load_batch(tmp_path / "nope.yaml")


def test_fidelity_on_defaults_to_builder_and_a_model_overrides_the_defaults(tmp_path):
    batch = load_batch(
        write(
            tmp_path,
            """
defaults: {precisions: Q8_0, pairs: [cpu, gpu], fidelity-on: Auto}
models:
  - repo: o/inherits
  - {repo: o/builder, fidelity-on: builder}
  - {repo: o/check, fidelity-on: CHECK}
""",
        )
    )
    assert [m.fidelity_on for m in batch.models] == ["auto", "builder", "check"]
    plain = load_batch(write(tmp_path, "models: [{repo: o/m, precisions: Q8_0, pairs: cpu}]"))
    assert plain.models[0].fidelity_on == "builder"
