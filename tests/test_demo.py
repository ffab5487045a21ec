"""`cecai-convert demo`: its output is checkable (`check` finds the runtime reference), as the README shows."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import CliResult

from cecai_converter.commands import DEMO_REFERENCE_LINE, _demo_asks_for_the_reference


@pytest.mark.slow
def test_demo_then_check_passes(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    # Fidelity and the source check are left out to keep the test short: check needs the reference alone.
    demo = cli("demo", "--workdir", tmp_path, "--no-fidelity", "--no-source-check")
    assert demo.returncode == 0, demo.stderr
    outputs = tmp_path / "TinyLlama" / "Converter" / "outputs" / "CPU_LLM_LLAMA"
    assert (outputs / "reference.json").is_file(), "check compares against the builder's reference.json"
    assert f"cecai-convert check {outputs} --pair CPU_LLM_LLAMA" in demo.stderr, "the demo says what to do next"

    check = cli("check", outputs, "--pair", "CPU_LLM_LLAMA", "--format", "json")
    assert check.returncode == 0, check.stderr
    record = json.loads(check.stdout)
    assert record["passed"] is True
    assert sorted(f["name"] for f in record["files"]) == ["tiny-llama.q4_k_m.gguf", "tiny-llama.q8_0.gguf"]
    assert all(f["sha256_match"] and f["agreement"]["kld_mean"] < 1e-6 for f in record["files"])


def _layout(tmp_path: Path, text: str) -> Path:
    converter = tmp_path / "Converter"
    (converter / "configurations").mkdir(parents=True)
    (converter / "configurations" / "converter_args.yaml").write_text(text, encoding="utf-8")
    return converter


def test_a_demo_folder_from_before_gets_the_reference_line(tmp_path: Path) -> None:
    converter = _layout(tmp_path, "MODEL_NAME: tiny-llama\nTRAINED: false")  # no final newline
    _demo_asks_for_the_reference(converter)
    general = converter / "configurations" / "converter_args.yaml"
    assert yaml.safe_load(general.read_text()) == {"MODEL_NAME": "tiny-llama", "TRAINED": False, "REFERENCE": True}
    _demo_asks_for_the_reference(converter)  # once only
    assert general.read_text().count(DEMO_REFERENCE_LINE) == 1


def test_a_reference_the_user_set_is_left_alone(tmp_path: Path) -> None:
    converter = _layout(tmp_path, "MODEL_NAME: tiny-llama\nREFERENCE: false\n")
    _demo_asks_for_the_reference(converter)
    assert (converter / "configurations" / "converter_args.yaml").read_text() == (
        "MODEL_NAME: tiny-llama\nREFERENCE: false\n"
    )


def test_the_model_configs_set_dtype_without_a_deprecation_message() -> None:
    """transformers >= 4.56 logs "`torch_dtype` is deprecated! Use `dtype` instead!" (once per process, through its
    logger: no Python warning that filterwarnings would catch) on every build that sets the old name: the demo's
    first lines were that message. A fresh process, so that the message cannot have been logged already."""
    script = (
        "from cecai_converter import modelgen\n"
        "for arch in modelgen.ARCHITECTURES:\n"
        "    config = modelgen._config(arch, modelgen.SIZES['tiny'], 'bfloat16').to_dict()\n"
        "    assert config.get('dtype') == 'bfloat16' and 'torch_dtype' not in config, arch\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "deprecated" not in proc.stderr.lower(), proc.stderr
