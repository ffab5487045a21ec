"""`cecai-convert doctor`: a prepared runner passes; a bare one gets each missing piece named with its fix.

Real where this machine allows it: the compilers really compile, cmake really runs, the disk is this disk, the engine
socket is a real path that nothing listens on. A GPU cannot be real here: the tests that fake ``nvidia-smi`` or stand
in for an engine's answers say so in their names.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CliResult, engine, run_cli
from test_gha import ROOT

from cecai_converter import doctor
from cecai_converter.doctor import (
    RUNNERS_BEGIN,
    RUNNERS_END,
    checks_for,
    diagnose,
    disk_needed,
    parse_size,
    runners_table,
)
from cecai_converter.doctor.probes import check_compilers, check_gpu
from cecai_converter.errors import UsageError
from cecai_converter.pairs import PAIRS

NO_ENGINE = "unix:///nonexistent"


CHECKS = ["python venv", "python", "C/C++ compiler", "cmake", "CUDA compiler", "GPU", "container engine", "image",
          "NVIDIA runtime", "disk"]  # fmt: skip


def rows(stdout: str) -> dict[str, tuple[str, str]]:
    """The human table's rows: check -> (status, detail)."""
    found = {}
    for line in stdout.splitlines():
        for name in CHECKS:
            m = re.match(rf"^{re.escape(name)}\s+(ok|MISSING|unchecked|skipped)\s+(.*)$", line)
            if m and name not in found:
                found[name] = (m[1], m[2])
                break
    return found


def fixes(stdout: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^fix ([^:]+): (.*)$", stdout, re.MULTILINE)}


@pytest.fixture
def bare_bin(tmp_path: Path) -> Path:
    """A PATH folder with only Python and the compiler (cc, c++ and the assembler and linker they run): no cmake."""
    folder = tmp_path / "bare-bin"
    folder.mkdir()
    for tool in ("cc", "c++", "as", "ld"):
        found = shutil.which(tool)
        assert found, f"this machine is prepared: {tool} should be on PATH"
        (folder / tool).symlink_to(found)
    (folder / "python").symlink_to(sys.executable)
    return folder


def bare_env(bare_bin: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CC", "CXX", "DOCKER_", "CECAI_IMAGE"))}
    return {**env, "PATH": str(bare_bin), "DOCKER_HOST": NO_ENGINE, **extra}


# -- a prepared runner ----------------------------------------------------------------------------------------------
def test_doctor_passes_on_this_prepared_builder_for_the_cpu_pair() -> None:
    result = run_cli("doctor", "--role", "builder", "--pair", "CPU_LLM_LLAMA")
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    assert list(table) == checks_for("builder", "local", PAIRS["CPU_LLM_LLAMA"])
    assert {status for status, _ in table.values()} == {"ok"}, result.stdout
    assert "compile and link" in table["C/C++ compiler"][1]
    assert re.search(r"cmake \d+\.\d+", table["cmake"][1])
    assert result.stdout.rstrip().endswith("ready")


def test_json_format_gives_every_finding_and_the_verdict() -> None:
    result = run_cli("doctor", "--role", "builder", "--model-size", "1MB", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] is True and data["role"] == "builder" and data["backend"] == "local"
    assert [f["check"] for f in data["findings"]] == checks_for("builder", "local", None)
    disk = data["findings"][-1]
    assert disk["status"] == "ok" and "4 × the 1.0 MB model + 3.0 GB" in disk["detail"]


# -- a bare runner --------------------------------------------------------------------------------------------------
def test_a_bare_builder_gets_cmake_and_disk_named_with_their_fixes(bare_bin: Path) -> None:
    free = shutil.disk_usage(ROOT).free
    result = run_cli(
        "doctor", "--role", "builder", "--pair", "cpu", "--model-size", str(free), "--path", ROOT,
        env=bare_env(bare_bin),
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    table = rows(result.stdout)
    assert table["C/C++ compiler"][0] == "ok", table  # the compiler on the bare PATH still works
    assert table["cmake"] == ("MISSING", "cmake is not on PATH (llama.cpp's tools are built with it)")
    assert table["disk"][0] == "MISSING" and "needs" in table["disk"][1]
    fix = fixes(result.stdout)
    assert set(fix) == {"cmake", "disk"}
    assert "apt-get install cmake" in fix["cmake"]
    assert "free" in fix["disk"] and "larger disk" in fix["disk"]
    assert "2 missing" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_check_runner_with_no_engine_gets_the_engine_named_and_the_image_left_unchecked(bare_bin: Path) -> None:
    result = run_cli("doctor", "--role", "check", "--pair", "CPU_LLM_LLAMA", env=bare_env(bare_bin))
    assert result.returncode == 1, result.stdout + result.stderr
    table = rows(result.stdout)
    assert list(table) == checks_for("check", "docker", PAIRS["CPU_LLM_LLAMA"])
    assert table["container engine"] == (
        "MISSING",
        f"no container engine answers at DOCKER_HOST={NO_ENGINE}: no such socket",
    )
    # Not pretended either way: the image cannot be looked up without an engine.
    assert table["image"][0] == "unchecked" and "needs the container engine" in table["image"][1]
    assert "export DOCKER_HOST=" in fixes(result.stdout)["container engine"]


def test_a_missing_compiler_is_named_with_the_error_it_gave(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("cc", "c++", "cmake"):  # no assembler: the compiler starts but cannot finish
        (folder / tool).symlink_to(shutil.which(tool) or tool)
    finding = check_compilers({"PATH": str(folder)})
    assert finding.status == "missing"
    assert "cannot compile a small C program" in finding.detail and "'as'" in finding.detail
    assert "build-essential" in finding.fix
    assert check_compilers({"PATH": str(tmp_path / "empty")}).detail.startswith("no C (cc, gcc, clang")


def test_github_format_turns_each_missing_piece_into_an_error_annotation(bare_bin: Path) -> None:
    result = run_cli("doctor", "--role", "check", "--pair", "cpu", "--github", env=bare_env(bare_bin))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    errors = [line for line in lines if line.startswith("::error ")]
    assert len(errors) == 1, result.stdout
    assert errors[0].startswith("::error title=cecai-converter doctor%3A container engine::no container engine")
    assert "Fix: start a container engine" in errors[0]
    assert any(line.startswith("::warning title=cecai-converter doctor%3A image::not checked") for line in lines)
    assert any(line.startswith("ok  python:") for line in lines)


# -- bad usage ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "check"], "a check runner needs --pair"),
        (["--pair", "TPU_LLM_LLAMA"], "unknown pair 'TPU_LLM_LLAMA'"),
        (["--model-size", "12 parsecs"], "--model-size '12 parsecs' is not a size"),
        (["--skip", "coffee"], "--skip 'coffee' is not a check"),
    ],
)
def test_bad_usage_exits_2_with_a_message(args: list[str], message: str) -> None:
    result = run_cli("doctor", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_role_exits_2() -> None:
    assert run_cli("doctor", "--role", "janitor").returncode == 2


def test_sizes_take_decimal_and_binary_units() -> None:
    assert parse_size("16GB") == parse_size("16 G") == 16 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("800mb") == 800 * 10**6
    assert parse_size("123") == 123
    for bad in ("", "GB", "-1GB", "1e9", "7 GBs"):
        with pytest.raises(UsageError):
            parse_size(bad)
    assert disk_needed("builder", 10**9) == 4 * 10**9 + 3 * 10**9
    assert disk_needed("check", None) == 10**9


def test_min_python_is_pyprojects_requires_python() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'requires-python = ">=(\d+)\.(\d+)"', text)
    assert match is not None
    assert (int(match[1]), int(match[2])) == doctor.MIN_PYTHON


# -- before the package is installed -------------------------------------------------------------------------------
def test_the_module_runs_on_a_bare_python_with_the_standard_library_only(tmp_path: Path) -> None:
    """The actions run it before installing: ``python -S`` sees no site-packages (no PyYAML, no docker SDK)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DOCKER_HOST": NO_ENGINE}
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import sys, cecai_converter.doctor; "
         "print(sorted(m for m in ('yaml', 'docker', 'numpy') if m in sys.modules))"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
    result = subprocess.run(
        [sys.executable, "-S", "-m", "cecai_converter.doctor", "--role", "check", "--pair", "arm", "--format", "json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    findings = {f["check"]: f for f in json.loads(result.stdout)["findings"]}
    assert findings["container engine"]["status"] == "missing"
    # The default image name needs the installed package: said, not guessed.
    assert findings["image"]["status"] == "unchecked" and "give --image" in findings["image"]["detail"]
    bad = subprocess.run(
        [sys.executable, "-S", "-m", "cecai_converter.doctor", "--pair", "nope", "--github"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stdout.startswith("::error title=cecai-converter doctor%3A bad input::")


# -- GPUs and engines that cannot be real here ----------------------------------------------------------------------
def fake_nvidia_smi(folder: Path, output: str, status: int = 0) -> Path:
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(output)}\nexit {status}\n")  # builtins only
    script.chmod(0o755)
    return folder


def test_gpu_visible_with_a_fake_nvidia_smi(tmp_path: Path) -> None:
    folder = fake_nvidia_smi(tmp_path / "bin", "GPU 0: NVIDIA H200 (UUID: GPU-0000)")
    finding = check_gpu(PAIRS["GPU_LLM_LLAMA"], {"PATH": str(folder)})
    assert (finding.status, finding.detail) == ("ok", "1 visible: GPU 0: NVIDIA H200 (UUID: GPU-0000)")


def test_gpu_missing_with_a_fake_failing_nvidia_smi_and_without_one(tmp_path: Path) -> None:
    folder = fake_nvidia_smi(
        tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate with the driver", 9
    )
    finding = check_gpu(PAIRS["GPU_LLM_LLAMA"], {"PATH": str(folder)})
    assert finding.status == "missing" and "couldn't communicate with the driver" in finding.detail
    assert "NVIDIA driver" in finding.fix and "gpu" in finding.fix  # the pair's labels
    none = check_gpu(PAIRS["GPU_LLM_LLAMA"], {"PATH": str(tmp_path / "empty")})
    assert "nvidia-smi is not on PATH" in none.detail


def test_a_local_gpu_check_runner_needs_the_pairs_cuda_compiler_with_a_fake_nvidia_smi(tmp_path: Path) -> None:
    folder = fake_nvidia_smi(tmp_path / "bin", "GPU 0: NVIDIA H200 (UUID: GPU-0000)")
    for tool in ("cc", "c++", "as", "ld", "cmake"):
        (folder / tool).symlink_to(shutil.which(tool) or tool)
    report = diagnose("check", PAIRS["GPU_LLM_LLAMA"], backend="local", environ={"PATH": str(folder)})
    found = {f.check: f for f in report.findings}
    assert list(found) == checks_for("check", "local", PAIRS["GPU_LLM_LLAMA"])
    assert found["GPU"].status == "ok"
    if not Path("/usr/local/cuda/bin/nvcc").exists():
        assert found["CUDA compiler"].status == "missing"
        assert "/usr/local/cuda/bin/nvcc" in found["CUDA compiler"].detail
        assert report.passed is False


class _EngineStandIn(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def engine_stand_in(path: Path, answers: Mapping[str, tuple[int, Any]]) -> _EngineStandIn:
    """A unix-socket HTTP server that answers some Docker Engine API paths as an engine would (the rest: 404)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers.get(self.path.split("?")[0].removeprefix("/v1.41"), (404, {"message": "no route"}))
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

        def address_string(self) -> str:  # a unix socket has no (host, port)
            return "stand-in"

    server = _EngineStandIn(str(path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def stand_in_engine(tmp_path: Path) -> Iterator[tuple[Path, dict[str, tuple[int, Any]]]]:
    answers: dict[str, tuple[int, Any]] = {
        "/_ping": (200, b"OK"),
        "/version": (200, {"Version": "5.4.0", "Components": [{"Name": "Podman Engine"}]}),
        "/info": (200, {"Runtimes": {"crun": {}, "runc": {}}}),
    }
    sock = tmp_path / "engine.sock"
    server = engine_stand_in(sock, answers)
    yield sock, answers
    server.shutdown()
    server.server_close()


def test_jetson_runtime_and_a_private_image_against_an_engine_stand_in(stand_in_engine: Any, tmp_path: Path) -> None:
    sock, answers = stand_in_engine
    image = "ghcr.io/someone/cecai-converter:0.1.0-agx-orin"
    quoted = "ghcr.io%2Fsomeone%2Fcecai-converter%3A0.1.0-agx-orin"
    answers[f"/distribution/{quoted}/json"] = (401, {"message": "unauthorized: authentication required"})
    orin = PAIRS["AGX_ORIN_LLM_LLAMA"]
    env = {"PATH": str(fake_nvidia_smi(tmp_path / "bin", "GPU 0: Orin (nvgpu)")), "DOCKER_HOST": f"unix://{sock}"}
    found = {f.check: f for f in diagnose("check", orin, image=image, environ=env).findings}
    assert found["container engine"].status == "ok" and "Podman Engine 5.4.0" in found["container engine"].detail
    assert found["image"].status == "missing"
    assert "unauthorized: authentication required" in found["image"].detail and "docker login" in found["image"].detail
    assert found["NVIDIA runtime"].status == "missing" and "crun, runc" in found["NVIDIA runtime"].detail
    assert "nvidia-ctk runtime configure" in found["NVIDIA runtime"].fix

    answers["/info"] = (200, {"Runtimes": {"nvidia": {}, "runc": {}}})
    answers[f"/images/{quoted}/json"] = (200, {"Config": {"Labels": {"io.cecai.pair": orin.name}}})
    found = {f.check: f for f in diagnose("check", orin, image=image, environ=env).findings}
    assert [found[c].status for c in ("container engine", "image", "GPU", "NVIDIA runtime")] == ["ok"] * 4


def test_an_image_built_for_another_pair_against_an_engine_stand_in(stand_in_engine: Any) -> None:
    sock, answers = stand_in_engine
    answers["/images/mine%3Acpu/json"] = (200, {"Config": {"Labels": {"io.cecai.pair": "CPU_LLM_LLAMA"}}})
    found = {
        f.check: f
        for f in diagnose(
            "check", PAIRS["ARM_LLM_LLAMA"], image="mine:cpu", environ={"PATH": "", "DOCKER_HOST": f"unix://{sock}"}
        ).findings
    }
    assert found["image"].status == "missing" and "built for CPU_LLM_LLAMA, not ARM_LLM_LLAMA" in found["image"].detail


def test_an_engine_over_ssh_is_unchecked_not_passed() -> None:
    report = diagnose("check", PAIRS["CPU_LLM_LLAMA"], environ={"PATH": "", "DOCKER_HOST": "ssh://me@host"})
    found = {f.check: f for f in report.findings}
    assert found["container engine"].status == "unchecked" and "TLS or ssh" in found["container engine"].detail
    assert found["image"].status == "unchecked"


@engine
@pytest.mark.engine
def test_the_real_engine_answers(cli_on_path: Path) -> None:
    result: CliResult = run_cli("doctor", "--role", "check", "--pair", "cpu", "--format", "json")
    findings = {f["check"]: f for f in json.loads(result.stdout)["findings"]}
    assert findings["container engine"]["status"] == "ok", findings


# -- docs/runners.md and the actions -------------------------------------------------------------------------------
def test_runners_doc_holds_the_table_the_pairs_give() -> None:
    doc = (ROOT / "docs" / "runners.md").read_text(encoding="utf-8")
    begin, end = doc.find(RUNNERS_BEGIN), doc.find(RUNNERS_END)
    assert begin != -1 and end > begin, "docs/runners.md lost its table markers"
    held = doc[begin + len(RUNNERS_BEGIN) : end].strip("\n") + "\n"
    assert held == runners_table(), (
        "docs/runners.md's table is stale; paste `python -c 'from cecai_converter.doctor import runners_table as t; "
        "print(t())'` between its markers"
    )
    for pair in PAIRS.values():
        assert f"| check {pair.name} | " + ", ".join(f"`{x}`" for x in pair.runner_labels) + " |" in held


ACTIONS = {"action.yml": "builder", "actions/convert/action.yml": "builder", "actions/check/action.yml": "check"}


@pytest.mark.parametrize(("path", "role"), ACTIONS.items())
def test_each_action_runs_doctor_before_it_installs(path: str, role: str) -> None:
    steps = yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))["runs"]["steps"]
    names = [s["name"] for s in steps]
    at = names.index("Check the runner for this job (cecai-convert doctor)")
    assert at < names.index("Install cecai-converter")
    step = steps[at]
    assert "${{" not in step["run"] and "doctor.sh" in step["run"] and f" {role} " in step["run"]
    assert set(step["env"]) >= {"INPUT_PYTHON", "INPUT_INSTALL", "INPUT_BACKEND", "INPUT_PAIR", "INPUT_IMAGE"}


def run_doctor_step(action: Path, inputs: dict[str, str], env: dict[str, str], cwd: Path) -> CliResult:
    """The action's doctor step as the runner runs it: inputs (defaults applied) and ``github.*`` evaluated into its
    env:, GITHUB_ACTION_PATH set, the `run:` script run by bash."""
    doc = yaml.safe_load(action.read_text(encoding="utf-8"))
    values = {name: str(spec.get("default", "")) for name, spec in doc["inputs"].items()} | inputs
    step = next(s for s in doc["runs"]["steps"] if "cecai-convert doctor" in s["name"])
    context = {"github.action_repository": "Someone/Fork"}

    def evaluate(text: str) -> str:
        return re.sub(
            r"\$\{\{\s*([\w.-]+)\s*\}\}",
            lambda m: values[m[1].removeprefix("inputs.")] if m[1].startswith("inputs.") else context[m[1]],
            text,
        )

    step_env = {
        **env,
        **{k: evaluate(str(v)) for k, v in step["env"].items()},
        "GITHUB_ACTION_PATH": str(action.parent),
    }
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        capture_output=True, text=True, env=step_env, cwd=cwd, check=False,
    )  # fmt: skip
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def test_check_action_stops_at_doctor_with_an_error_annotation(tmp_path: Path, cli_on_path: Path) -> None:
    (tmp_path / "files").mkdir()
    inputs = {"path": "files", "pair": "cpu", "install": "false"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_", "CECAI_IMAGE"))}
    env |= {"DOCKER_HOST": NO_ENGINE, "PATH": f"{cli_on_path}{os.pathsep}{os.environ['PATH']}"}
    result = run_doctor_step(ROOT / "actions" / "check" / "action.yml", inputs, env, tmp_path)
    assert result.returncode == 1, result
    assert "::error title=cecai-converter doctor%3A container engine::" in result.stdout
    # The default image follows the action's repository (a fork's own), as the step that runs it does.
    assert "::warning title=cecai-converter doctor%3A image::not checked: ghcr.io/someone/fork:" in result.stdout
    # install: false: nothing will be installed, so no venv is needed
    assert "skipped  python venv: not checked: --skip" in result.stdout
    assert "::warning title=cecai-converter doctor%3A python venv" not in result.stdout

    built = run_doctor_step(ROOT / "action.yml", {"model": "o/m", "install": "false"}, env, tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "ok  cmake:" in built.stdout and "::error" not in built.stdout

    skipped = subprocess.run(
        ["bash", str(ROOT / "actions" / "doctor.sh"), "check", str(ROOT)],
        capture_output=True, text=True, env={**os.environ, "DOCKER_HOST": NO_ENGINE, "CECAI_DOCTOR": "off"},
        check=False,
    )  # fmt: skip
    assert skipped.returncode == 0 and skipped.stdout == "cecai-convert doctor: skipped (CECAI_DOCTOR=off)\n"


def test_doctor_script_runs_from_the_source_before_install(tmp_path: Path, bare_bin: Path) -> None:
    """install: true: the runner's Python runs the module from the action's source; no cmake on the bare PATH."""
    (bare_bin / "bash").symlink_to(shutil.which("bash") or "/bin/bash")
    env = bare_env(bare_bin, INPUT_PYTHON=sys.executable, INPUT_INSTALL="true", INPUT_BACKEND="local")
    proc = subprocess.run(
        ["bash", str(ROOT / "actions" / "doctor.sh"), "builder", str(ROOT)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "::error title=cecai-converter doctor%3A cmake::cmake is not on PATH" in proc.stdout
    assert "ok  C/C++ compiler:" in proc.stdout
    missing_python = subprocess.run(
        ["bash", str(ROOT / "actions" / "doctor.sh"), "builder", str(ROOT)],
        capture_output=True, text=True, env={**env, "INPUT_PYTHON": "python9.9"}, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert missing_python.returncode == 1
    assert "::error title=cecai-converter doctor%3A python::python9.9 is not on PATH" in missing_python.stdout
