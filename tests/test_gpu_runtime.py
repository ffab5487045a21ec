"""The GPU pair on a CUDA build of llama-cpp-python: layers offloaded, and the manifest says so.

These tests need a GPU and a CUDA build of the pinned llama-cpp-python; everywhere else (CI included) they are
skipped with the reason. `scripts/gpu-check.sh` builds that runtime on a GPU machine and runs them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import PARTS, require_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.gpu]


def _gpu_runtime() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


if not _gpu_runtime():
    require_or_skip("gpu", f"this llama-cpp-python cannot offload to a GPU; the tests need {PARTS['gpu']}")


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory, tiny_llama, cli) -> Path:
    """The same model for CPU_LLM_LLAMA and GPU_LLM_LLAMA in one run, fidelity on."""
    conv = tmp_path_factory.mktemp("gpu") / "Converter"
    cfg = conv / "configurations"
    general = {"IMAGE_NAME": "x", "MODEL_NAME": "m", "TRAINED": False}
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "GPU_LLM_LLAMA").mkdir()
    (cfg / "converter_args.yaml").write_text(yaml.safe_dump(general))
    for pair in ("CPU_LLM_LLAMA", "GPU_LLM_LLAMA"):
        (cfg / pair / f"converter_args_{pair.lower()}.yaml").write_text("PRECISION: [Q8_0, Q4_K_M, Q2_K]\n")
    shutil.copytree(tiny_llama, conv / "models" / "m")
    result = cli("run", conv, "--format", "json")
    assert result.returncode == 0, result.stderr
    return conv


def _manifest(conv: Path, pair: str) -> dict:
    return json.loads((conv / "outputs" / pair / "manifest.json").read_text())


def test_gpu_pair_verifies_and_measures_on_the_gpu(two_pairs: Path) -> None:
    gpu = _manifest(two_pairs, "GPU_LLM_LLAMA")
    assert gpu["runtime"]["n_gpu_layers"] == -1
    for entry in gpu["files"]:
        assert entry["verification"]["runtime"] == "cuda", entry["name"]
        assert entry["fidelity"]["device"] == "cuda", entry["name"]
    cpu = _manifest(two_pairs, "CPU_LLM_LLAMA")
    assert cpu["runtime"]["n_gpu_layers"] == 0
    assert {e["fidelity"]["device"] for e in cpu["files"]} == {"cpu"}


def test_the_files_do_not_depend_on_the_pair(two_pairs: Path) -> None:
    gpu = {e["name"]: e["sha256"] for e in _manifest(two_pairs, "GPU_LLM_LLAMA")["files"]}
    cpu = {e["name"]: e["sha256"] for e in _manifest(two_pairs, "CPU_LLM_LLAMA")["files"]}
    assert gpu == cpu and len(gpu) == 3


def test_gpu_fidelity_orders_like_the_cpu_and_agrees_with_it(two_pairs: Path) -> None:
    gpu = {e["precision"]: e["fidelity"] for e in _manifest(two_pairs, "GPU_LLM_LLAMA")["files"]}
    cpu = {e["precision"]: e["fidelity"] for e in _manifest(two_pairs, "CPU_LLM_LLAMA")["files"]}
    assert gpu["Q8_0"]["kld_mean"] < gpu["Q4_K_M"]["kld_mean"] < gpu["Q2_K"]["kld_mean"]
    for precision in gpu:
        # Different kernels, same files: the numbers agree to within what accumulation order changes.
        g, c = gpu[precision]["kld_mean"], cpu[precision]["kld_mean"]
        assert abs(g - c) <= 0.10 * c + 1e-3, (precision, g, c)
