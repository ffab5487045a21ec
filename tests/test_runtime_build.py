"""The wheel cache key of a runner's llama-cpp-python: one per pin, CPU architecture and build flags.

actions/install.sh computes it before the package is installed, so the module must run on the standard library
alone (``python -S``: no site-packages).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

from cecai_converter.pairs import PAIRS
from cecai_converter.runtime_build import cmake_args, main, wheel_key
from cecai_converter.toolchain import LLAMA_CPP_PYTHON_VERSION

ROOT = Path(__file__).resolve().parents[1]


def test_flags_come_from_the_pair_table_and_cmake_args_overrides_them() -> None:
    assert cmake_args("GPU_LLM_LLAMA", {}) == " ".join(PAIRS["GPU_LLM_LLAMA"].cmake_args)
    assert cmake_args("arm", {}) == " ".join(PAIRS["ARM_LLM_LLAMA"].cmake_args)
    assert cmake_args("gpu", {"CMAKE_ARGS": "-DGGML_VULKAN=on"}) == "-DGGML_VULKAN=on"


def test_one_key_per_pin_architecture_and_flags() -> None:
    cpu, gpu = wheel_key("cpu", {}), wheel_key("gpu", {})
    assert cpu.startswith(f"{LLAMA_CPP_PYTHON_VERSION}-{platform.machine().lower()}-")
    assert cpu != gpu and wheel_key("cpu", {}) == cpu
    assert wheel_key("cpu", {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}) != cpu


def test_an_unknown_pair_is_exit_2(capsys) -> None:
    assert main(["wheel-key", "tpu"]) == 2
    assert "unknown pair 'tpu'" in capsys.readouterr().err
    assert main(["nothing"]) == 2


def test_runs_without_site_packages_as_install_sh_runs_it() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
        "from cecai_converter.runtime_build import main; main(['wheel-key', 'cpu'])"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == wheel_key("cpu", {})


def test_install_sh_prints_the_same_key() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "actions" / "install.sh"), "--wheel-key", str(ROOT), "GPU_LLM_LLAMA"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "INPUT_PYTHON": sys.executable},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == wheel_key("GPU_LLM_LLAMA", {})
