"""Processes (issue 9, items 6 and 10): no child outlives a killed run, and one run at a time per outputs folder.

Real processes throughout: the CLI as a user starts it, and the pinned converter behind a *gate*, a stand-in
``convert_hf_to_gguf.py`` that records its pid and waits for the test to open the gate before it hands over (exec)
to the real converter. The gate makes "the converter is running" a state the test holds for as long as it needs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ggufs_under, process_alive

_GATED_CONVERTER = textwrap.dedent(
    """
    import os, sys, time
    pidfile = os.environ["CECAI_TEST_CONVERTER_PIDFILE"]
    with open(pidfile + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(pidfile + ".tmp", pidfile)
    gate = os.environ["CECAI_TEST_CONVERTER_GATE"]
    deadline = time.monotonic() + 300
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            sys.exit("the gate never opened")
        time.sleep(0.05)
    real = os.environ["CECAI_TEST_REAL_CONVERTER"]
    os.execv(sys.executable, [sys.executable, real, *sys.argv[1:]])
    """
)


@dataclass
class Gate:
    env: dict[str, str]
    pidfile: Path
    gate: Path

    def converter_pid(self, proc: subprocess.Popen[str], timeout: float = 120) -> int:
        """The pid of the converter ``proc`` started, once it runs."""
        deadline = time.monotonic() + timeout
        while not self.pidfile.is_file():
            assert proc.poll() is None, f"the run ended ({proc.returncode}) before its converter started"
            assert time.monotonic() < deadline, "the converter never started"
            time.sleep(0.05)
        return int(self.pidfile.read_text())

    def open(self) -> None:
        self.gate.write_text("go")


@pytest.fixture
def gated(tmp_path: Path) -> Gate:
    """A toolchain folder (``CECAI_TOOLCHAIN_DIR``) whose converter waits at the gate, then runs the real one."""
    from cecai_converter.toolchain import LLAMA_CPP_PYTHON_VERSION, ensure_converter

    real = ensure_converter()
    converter = tmp_path / "toolchain" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}" / "converter"
    (converter / "conversion").mkdir(parents=True)
    shutil.copy(real / "cecai-toolchain.json", converter)
    shutil.copy(real / "conversion" / "__init__.py", converter / "conversion")  # the architectures it knows
    (converter / "convert_hf_to_gguf.py").write_text(_GATED_CONVERTER)
    pidfile, gate = tmp_path / "converter.pid", tmp_path / "gate"
    env = {
        **os.environ,
        "CECAI_TOOLCHAIN_DIR": str(tmp_path / "toolchain"),
        "CECAI_TEST_CONVERTER_PIDFILE": str(pidfile),
        "CECAI_TEST_CONVERTER_GATE": str(gate),
        "CECAI_TEST_REAL_CONVERTER": str(real / "convert_hf_to_gguf.py"),
    }
    return Gate(env, pidfile, gate)


def _start(model: Path, outdir: Path, env: dict[str, str], stderr: Path | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "cecai_converter", "convert", str(model), "--precision", "Q8_0"]
    with Path(stderr or os.devnull).open("w") as err:  # the child keeps its own copy
        return subprocess.Popen(
            [*argv, "--outdir", str(outdir), "--no-fidelity"], stdout=subprocess.DEVNULL, stderr=err, env=env, text=True
        )


needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")


@pytest.mark.slow
@needs_linux
def test_sigkill_of_the_run_takes_the_converter_with_it_and_the_next_run_starts_clean(
    tiny_llama, tmp_path, cli, gated, reaper
):
    outdir = tmp_path / "out"
    run = _start(tiny_llama, outdir, gated.env)
    reaper.append(run.pid)
    converter = gated.converter_pid(run)
    reaper.append(converter)
    assert process_alive(converter)
    run.kill()  # kill -9: the run gets no chance to stop its child itself
    run.wait(timeout=30)
    deadline = time.monotonic() + 5
    while process_alive(converter) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(converter), "convert_hf_to_gguf.py outlived the run that started it"
    assert list(outdir.glob(".cecai-tmp-*")), "the killed run left its staging folder (removed by the next run)"

    again = cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity")
    assert again.returncode == 0, again.stderr
    assert "removed leftovers of an interrupted run" in again.stderr
    assert [p.name for p in ggufs_under(outdir)] == [f"{tiny_llama.name}.q8_0.gguf"]
    assert not list(outdir.glob(".cecai-tmp-*")) and not (outdir / ".cecai.lock").exists()


_CHILD = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
_PARENTS = {
    # processes.run_tool: the converter, llama-imatrix, and every worker (processes.run_worker runs them through it)
    "run_tool": "from cecai_converter.processes import run_tool; run_tool(CMD)",
    # subprocess calls not on run_tool yet: the llama.cpp tools build and the sdist download
    "child_kwargs": "import subprocess; from cecai_converter.processes import child_kwargs; "
    "subprocess.run(CMD, **child_kwargs())",
}


@needs_linux
@pytest.mark.parametrize("how", sorted(_PARENTS))
def test_sigkill_of_a_parent_takes_its_worker_with_it(tmp_path, reaper, how):
    pidfile = tmp_path / "worker.pid"
    cmd = [sys.executable, "-c", _CHILD, str(pidfile)]
    parent = subprocess.Popen([sys.executable, "-c", _PARENTS[how].replace("CMD", repr(cmd))])
    reaper.append(parent.pid)
    deadline = time.monotonic() + 60
    while not pidfile.is_file() or not pidfile.read_text():
        assert parent.poll() is None and time.monotonic() < deadline, "the worker never started"
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    reaper.append(worker)
    parent.kill()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 5
    while process_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(worker), f"the worker started by {how} outlived its parent"


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while text not in (content := path.read_text() if path.is_file() else ""):
        assert proc.poll() is None, f"ended ({proc.returncode}) without saying {text!r}:\n{content}"
        assert time.monotonic() < deadline, f"never said {text!r}:\n{content}"
        time.sleep(0.05)
    return content


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_waits_for_the_first_then_finds_the_work_done(
    tiny_llama, tmp_path, gated, reaper
):
    outdir = tmp_path / "out"
    first = _start(tiny_llama, outdir, gated.env, stderr=tmp_path / "first.err")
    reaper.append(first.pid)
    reaper.append(gated.converter_pid(first))  # the first run holds the folder and is converting
    second = _start(tiny_llama, outdir, gated.env, stderr=tmp_path / "second.err")
    reaper.append(second.pid)
    said = _wait_for_text(tmp_path / "second.err", "waiting for run PID", second)
    assert f"waiting for run PID {first.pid} (started " in said
    assert f"converting into {outdir}" in said and "cecai-convert convert" in said
    gated.open()
    assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()
    assert second.wait(timeout=600) == 0, (tmp_path / "second.err").read_text()
    err = (tmp_path / "second.err").read_text()
    assert "up to date" in err and "Traceback" not in err
    assert not (outdir / ".cecai.lock").exists()
    assert [p.name for p in ggufs_under(outdir)] == [f"{tiny_llama.name}.q8_0.gguf"]


@pytest.mark.slow
def test_a_second_run_gives_up_after_the_lock_timeout_with_exit_1(tiny_llama, tmp_path, gated, reaper):
    outdir = tmp_path / "out"
    first = _start(tiny_llama, outdir, gated.env)
    reaper.append(first.pid)
    reaper.append(gated.converter_pid(first))
    started = time.monotonic()
    argv = ["convert", str(tiny_llama), "--precision", "Q4_K_M", "--outdir", str(outdir), "--no-fidelity"]
    second = subprocess.run(
        [sys.executable, "-m", "cecai_converter", *argv],
        env={**gated.env, "CECAI_LOCK_TIMEOUT": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1, second.stderr
    assert time.monotonic() - started >= 1
    assert f"run PID {first.pid}" in second.stderr and f"is converting into {outdir}" in second.stderr
    assert "gave up after waiting 1 s" in second.stderr and "Traceback" not in second.stderr
    assert list(outdir.glob(".cecai-tmp-*")), "the first run's staging folder is untouched"
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 130
    assert ggufs_under(outdir) == [] and not list(outdir.glob(".cecai-tmp-*"))


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_lock_timeout_is_refused(tiny_llama, tmp_path, cli, value):
    result = cli(
        "convert", tiny_llama, "--precision", "Q8_0", "--outdir", tmp_path / "out", env={"CECAI_LOCK_TIMEOUT": value}
    )
    assert result.returncode == 2 and "CECAI_LOCK_TIMEOUT" in result.stderr and "Traceback" not in result.stderr
    assert ggufs_under(tmp_path / "out") == []
