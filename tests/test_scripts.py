"""The seed-compatible scripts (``scripts/converter_<pair>.sh``) and the engine helper scripts.

The scripts are thin callers of the CLI; these tests run them for real (no stand-in for ``cecai-convert``) on
inputs that fail fast, to show the argument, the pair and the exit status all pass through. The CPU script's full
conversion through the docker backend runs in ``test_docker_backend.py`` (engine tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cecai_converter.pairs import PAIRS, PairInfo

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _script(pair: PairInfo) -> Path:
    return SCRIPTS / f"converter_{pair.name.lower()}.sh"


def _env(**extra: str) -> dict[str, str]:
    # The venv's cecai-convert first on PATH, as after `pip install`.
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def _run(script: Path, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_script_is_a_thin_caller_of_the_cli(pair: PairInfo) -> None:
    script = _script(pair)
    assert script.is_file() and os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert f'exec bash "$(dirname "$0")/lib/converter_pair.sh" {pair.name} "$@"' in text
    shared = (SCRIPTS / "lib" / "converter_pair.sh").read_text()
    assert 'exec cecai-convert run "$1" --pair "$pair" "${@:2}"' in shared
    assert "--backend" not in shared.split("exec ", 1)[1], "the CLI picks the backend, not the script"
    for path in (script, SCRIPTS / "lib" / "converter_pair.sh"):
        assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_script_without_argument_is_a_usage_error(pair: PairInfo) -> None:
    proc = _run(_script(pair))
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Converter" in proc.stderr


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_script_passes_folder_and_exit_status_through(pair: PairInfo, tmp_path: Path) -> None:
    missing = tmp_path / "GPT_2" / "Converter"
    proc = _run(_script(pair), missing, CECAI_BACKEND="local")
    assert proc.returncode == 2, proc.stderr  # the CLI's usage exit code, unchanged
    assert "Converter folder not found" in proc.stderr and str(missing) in proc.stderr


@pytest.mark.parametrize("pair", [p for p in PAIRS.values() if p.name != "CPU_LLM_LLAMA"], ids=lambda p: p.slug)
def test_script_selects_its_pair(pair: PairInfo, tmp_path: Path) -> None:
    # A Converter folder configured for CPU only: the other pairs' scripts ask for their own pair's file.
    converter = tmp_path / "GPT_2" / "Converter"
    (converter / "configurations" / "CPU_LLM_LLAMA").mkdir(parents=True)
    (converter / "configurations" / "converter_args.yaml").write_text("MODEL_NAME: tiny-llama\n")
    (converter / "configurations" / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text(
        "PRECISION: Q8_0\n"
    )
    proc = _run(_script(pair), converter, CECAI_BACKEND="local")
    assert proc.returncode == 2, proc.stderr
    assert pair.config_filename in proc.stderr


@pytest.mark.parametrize("pair", PAIRS.values(), ids=lambda p: p.slug)
def test_script_leaves_the_backend_to_the_cli(pair: PairInfo, tmp_path: Path) -> None:
    # CECAI_BACKEND reaches the CLI's one default (cecai_converter.backends.default_backend), which names it.
    proc = _run(_script(pair), tmp_path / "Converter", CECAI_BACKEND="podman")
    assert proc.returncode == 2, proc.stderr
    assert "CECAI_BACKEND='podman' is not a backend" in proc.stderr and "local, docker" in proc.stderr


def test_script_reports_a_missing_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["/bin/bash", str(_script(PAIRS["CPU_LLM_LLAMA"])), str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 127
    assert "cecai-convert is not on PATH" in proc.stderr


@pytest.mark.parametrize("name", ["start-podman.sh", "build-image.sh", "build-cpu-image.sh"])
def test_helper_scripts_parse(name: str) -> None:
    script = SCRIPTS / name
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_build_cpu_image_is_build_image_for_the_cpu_pair() -> None:
    text = (SCRIPTS / "build-cpu-image.sh").read_text()
    assert 'exec bash "$(dirname "${BASH_SOURCE[0]}")/build-image.sh" CPU_LLM_LLAMA "$@"' in text


@pytest.mark.parametrize("args", [(), ("NOT_A_PAIR",)], ids=["no-pair", "unknown-pair"])
def test_build_image_refuses_a_missing_or_unknown_pair(args: tuple[str, ...]) -> None:
    # Fails before any engine or network is touched: the pair is read from pairs.py first.
    proc = _run(SCRIPTS / "build-image.sh", *args, PYTHON=sys.executable)
    assert proc.returncode == 2, proc.stderr
    assert ("usage: scripts/build-image.sh PAIR" in proc.stderr) if not args else ("unknown pair" in proc.stderr)
