"""The Converter folder contract: real YAML files, merging, and every way they can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cecai_converter.config import load_converter_dir, safe_child
from cecai_converter.errors import ConfigError, UsageError


def write_layout(root: Path, general: dict | str, pairs: dict[str, dict | str]) -> Path:
    converter = root / "Converter"
    cfg = converter / "configurations"
    cfg.mkdir(parents=True)
    text = general if isinstance(general, str) else yaml.safe_dump(general)
    (cfg / "converter_args.yaml").write_text(text)
    for pair, data in pairs.items():
        (cfg / pair).mkdir()
        body = data if isinstance(data, str) else yaml.safe_dump(data)
        (cfg / pair / f"converter_args_{pair.lower()}.yaml").write_text(body)
    (converter / "models" / "gpt2").mkdir(parents=True)
    return converter


GENERAL = {
    "IMAGE_NAME": "img:cpu",
    "MODEL_NAME": "gpt2",
    "TRAINED": True,
    "MODELS_PATH": "../models",
    "LOGS_PATH": "../logs",
    "OUTPUTS_PATH": "../outputs",
}


def test_seed_layout_resolves_paths_relative_to_configurations(tmp_path):
    conv = write_layout(tmp_path, GENERAL, {"CPU_LLM_LLAMA": {"PRECISION": "FP16"}})
    (job,) = load_converter_dir(conv)
    assert job.model_dir == (conv / "models" / "gpt2").resolve()
    assert job.outputs_dir == (conv / "outputs" / "CPU_LLM_LLAMA").resolve()
    assert job.log_file == (conv / "logs" / "CPU_LLM_LLAMA" / "Converter_CPU_LLM_LLAMA_gpt2.log").resolve()
    assert [p.name for p in job.precisions] == ["F16"]
    assert job.image_name == "img:cpu" and job.trained is True


def test_path_defaults_apply_when_keys_are_absent(tmp_path):
    conv = write_layout(tmp_path, {"MODEL_NAME": "gpt2"}, {"CPU_LLM_LLAMA": {"PRECISION": "Q8_0"}})
    (job,) = load_converter_dir(conv)
    assert job.outputs_dir == (conv / "outputs" / "CPU_LLM_LLAMA").resolve()


def test_pair_file_wins_and_lists_are_accepted(tmp_path):
    conv = write_layout(
        tmp_path,
        {**GENERAL, "PRECISION": "F16", "IMAGE_NAME": "general"},
        {
            "GPU_LLM_LLAMA": {"PRECISION": ["q8_0", "Q4_K_M"], "IMAGE_NAME": "gpu-image"},
            "CPU_LLM_LLAMA": {},
        },
    )
    jobs = {j.pair.name: j for j in load_converter_dir(conv)}
    assert [p.name for p in jobs["GPU_LLM_LLAMA"].precisions] == ["Q8_0", "Q4_K_M"]
    assert jobs["GPU_LLM_LLAMA"].image_name == "gpu-image"
    assert [p.name for p in jobs["CPU_LLM_LLAMA"].precisions] == ["F16"]  # inherited from the general file
    assert jobs["CPU_LLM_LLAMA"].image_name == "general"


def test_pairs_can_be_selected_by_name_or_slug(tmp_path):
    conv = write_layout(
        tmp_path, GENERAL, {"CPU_LLM_LLAMA": {"PRECISION": "F16"}, "ARM_LLM_LLAMA": {"PRECISION": "Q4_0"}}
    )
    assert [j.pair.name for j in load_converter_dir(conv, ["arm"])] == ["ARM_LLM_LLAMA"]
    assert [j.pair.name for j in load_converter_dir(conv, ["CPU_LLM_LLAMA", "cpu"])] == ["CPU_LLM_LLAMA"]


def test_unknown_key_names_the_closest_known_key(tmp_path):
    conv = write_layout(tmp_path, {**GENERAL, "MODEL_NAEM": "x"}, {"CPU_LLM_LLAMA": {"PRECISION": "F16"}})
    with pytest.raises(ConfigError) as info:
        load_converter_dir(conv)
    assert "unknown key 'MODEL_NAEM'" in info.value.message
    assert "Did you mean MODEL_NAME?" in info.value.message


def test_unknown_precision_never_falls_back(tmp_path):
    conv = write_layout(tmp_path, GENERAL, {"CPU_LLM_LLAMA": {"PRECISION": "INT4"}})
    with pytest.raises(ConfigError) as info:
        load_converter_dir(conv)
    assert "unknown precision 'INT4'" in info.value.message
    assert "Q4_K_M" in info.value.hint


def test_yaml_syntax_error_gives_file_line_and_column(tmp_path):
    conv = write_layout(tmp_path, "MODEL_NAME: gpt2\nPRECISION: [F16\n", {"CPU_LLM_LLAMA": {}})
    with pytest.raises(ConfigError) as info:
        load_converter_dir(conv)
    assert "converter_args.yaml: invalid YAML at line" in info.value.message
    assert info.value.exit_code == 2


def test_a_list_instead_of_a_mapping_is_refused(tmp_path):
    conv = write_layout(tmp_path, "- MODEL_NAME\n", {"CPU_LLM_LLAMA": {}})
    with pytest.raises(ConfigError, match="expected `KEY: value` lines"):
        load_converter_dir(conv)


@pytest.mark.parametrize("name", ["../escape", "/etc", "a/../../b", ""])
def test_model_name_may_not_escape_models_path(tmp_path, name):
    conv = write_layout(tmp_path, {**GENERAL, "MODEL_NAME": name}, {"CPU_LLM_LLAMA": {"PRECISION": "F16"}})
    with pytest.raises(ConfigError):
        load_converter_dir(conv)


def test_model_name_symlink_out_of_models_path_is_refused(tmp_path):
    conv = write_layout(tmp_path, {**GENERAL, "MODEL_NAME": "link"}, {"CPU_LLM_LLAMA": {"PRECISION": "F16"}})
    (conv / "models" / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        safe_child(conv / "models", "link", key="MODEL_NAME")


def test_missing_pieces_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="Converter folder not found"):
        load_converter_dir(tmp_path / "nope")
    conv = write_layout(tmp_path, GENERAL, {"CPU_LLM_LLAMA": {"PRECISION": "F16"}})
    with pytest.raises(UsageError, match=r"missing .*converter_args_gpu_llm_llama\.yaml"):
        load_converter_dir(conv, ["GPU_LLM_LLAMA"])
    with pytest.raises(UsageError, match="unknown pair 'TPU'"):
        load_converter_dir(conv, ["TPU"])


def test_misspelt_pair_folder_is_reported(tmp_path):
    conv = write_layout(tmp_path, GENERAL, {"CPU_LLM_LAMA": {"PRECISION": "F16"}})
    with pytest.raises(ConfigError, match="Did you mean CPU_LLM_LLAMA"):
        load_converter_dir(conv)


def test_missing_precision_and_model_name(tmp_path):
    conv = write_layout(tmp_path, {"MODELS_PATH": "../models"}, {"CPU_LLM_LLAMA": {"PRECISION": "F16"}})
    with pytest.raises(ConfigError, match="MODEL_NAME is required"):
        load_converter_dir(conv)
    conv2 = write_layout(tmp_path / "b", GENERAL, {"CPU_LLM_LLAMA": {}})
    with pytest.raises(ConfigError, match="PRECISION is required"):
        load_converter_dir(conv2)


def test_wrong_value_types_are_refused(tmp_path):
    conv = write_layout(tmp_path, {**GENERAL, "TRAINED": "yes please"}, {"CPU_LLM_LLAMA": {"PRECISION": "F16"}})
    with pytest.raises(ConfigError, match=r"/converter_args\.yaml: TRAINED must be a bool"):  # the file that set it
        load_converter_dir(conv)


def test_path_overrides_replace_yaml_paths(tmp_path):
    conv = write_layout(tmp_path, GENERAL, {"CPU_LLM_LLAMA": {"PRECISION": "F16"}})
    (job,) = load_converter_dir(conv, path_overrides={"OUTPUTS_PATH": tmp_path / "elsewhere"})
    assert job.outputs_dir == (tmp_path / "elsewhere" / "CPU_LLM_LLAMA").resolve()
