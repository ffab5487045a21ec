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


def _steps(action: Path) -> dict[str, dict]:
    import yaml

    return {step["name"]: step for step in yaml.safe_load(action.read_text(encoding="utf-8"))["runs"]["steps"]}


def test_hosted_runners_cache_the_wheel_under_install_shs_key(tmp_path: Path) -> None:
    """Both convert actions: on a GitHub-hosted runner with the local backend, the wheel folder install.sh fills is
    saved and restored by actions/cache under the wheel key (run here for real, as bash would run the step)."""
    for action, action_path in ((ROOT / "action.yml", ROOT), (ROOT / "actions" / "convert" / "action.yml", None)):
        steps = _steps(action)
        names = list(steps)
        key_step, cache_step = steps["Wheel cache key"], steps["Cache the llama-cpp-python wheel"]
        assert names.index("Wheel cache key") < names.index("Cache the llama-cpp-python wheel")
        assert names.index("Cache the llama-cpp-python wheel") < names.index("Install cecai-converter")
        assert key_step["if"] == (
            "inputs.install == 'true' && inputs.backend == 'local' && runner.environment == 'github-hosted'"
        )
        assert cache_step["uses"].startswith("actions/cache@") and cache_step["if"] == "steps.wheel.outputs.key != ''"
        assert cache_step["with"] == {
            "path": "${{ steps.wheel.outputs.path }}",
            "key": "cecai-converter-llama-cpp-python-${{ steps.wheel.outputs.key }}",
        }
        output = tmp_path / f"out-{action.parent.name}"
        proc = subprocess.run(
            ["bash", "-e", "-c", key_step["run"]],
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(tmp_path),
                "INPUT_PYTHON": sys.executable,
                "INPUT_PAIR": "GPU_LLM_LLAMA",
                "GITHUB_ACTION_PATH": str(action_path or action.parent),
                "GITHUB_OUTPUT": str(output),
            },
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        key = wheel_key("GPU_LLM_LLAMA", {})
        assert output.read_text().splitlines() == [
            f"key={key}",
            f"path={tmp_path}/.cache/cecai-converter/wheels/{key}",  # where install.sh looks for and builds it
        ]


def test_install_sh_shows_the_wheel_build_progress() -> None:
    script = (ROOT / "actions" / "install.sh").read_text(encoding="utf-8")
    build = script[script.index("pip wheel") - 400 : script.index("pip wheel") + 200]
    assert "--quiet" not in build and "pip wheel -v" in build
    assert 'dev_install.py" heartbeat' in build, "a progress line every 30 s, cmake's output in a log"
