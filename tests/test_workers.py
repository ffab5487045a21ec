"""The one worker protocol (processes.run_worker / processes.serve_job): a JSON job in, a JSON result out.

Real processes throughout. A small worker module written for these tests (``cecai_test_worker``, served by the real
``serve_job``) does as its job says: answer, raise, refuse, abort like llama.cpp's GGML_ASSERT, exit without a
result, write a broken result, or sleep after starting a grandchild (one that ignores SIGTERM, if asked). The real
workers (token count, verification) run on a real GGUF made by the pinned converter.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import convert_to_f32, process_alive

from cecai_converter import processes
from cecai_converter.errors import EXIT_FAILED, EXIT_USAGE, ConversionFailed, ConverterError, VerificationFailed
from cecai_converter.llama_vocab import count_tokens
from cecai_converter.precisions import PRECISIONS
from cecai_converter.processes import WorkerFailed, WorkerUsage, describe_exit, run_worker, serve_job
from cecai_converter.quantize import quantize
from cecai_converter.verify import load_check, load_check_many

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc are Linux's")

_WORKER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from cecai_converter.processes import WorkerUsage, serve_job

    GRANDCHILD = (
        "import os, signal, sys, time\\n"
        "if sys.argv[2] == '1': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
        "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\\n"
        "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\\n"
        "time.sleep(300)\\n"
    )

    def handle(job):
        what = job["do"]
        print(f"worker: {what}", flush=True)
        if what == "echo":
            return {"echo": job["value"], "pid": os.getpid(), "pgid": os.getpgid(0), "job": sys.argv[2]}
        if what == "abort":
            print("ggml/src/ggml.c:12: GGML_ASSERT(n_dims > 0) failed", flush=True)
            os.abort()
        if what == "raise":
            print("llama_model_load: error loading model: tensor data is not within the file bounds", flush=True)
            raise ValueError("Failed to load model from file")
        if what == "usage":
            raise WorkerUsage("the text gave only 3 tokens")
        if what == "no-result":
            os._exit(0)
        if what == "broken-result":
            with open(sys.argv[sys.argv.index("--result") + 1], "w") as fh:
                fh.write('{"ok": tr')
            os._exit(0)
        if what == "exit-3":
            os._exit(3)
        if what == "sleep":
            pidfile = job["pidfile"]
            subprocess.Popen([sys.executable, "-c", GRANDCHILD, pidfile, "1" if job["ignore_term"] else "0"])
            while not os.path.exists(pidfile):
                time.sleep(0.02)
            print("worker: ready", flush=True)
            time.sleep(300)
        raise AssertionError(what)

    if __name__ == "__main__":
        sys.exit(serve_job(handle))
    """
)


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment under which ``python -m cecai_test_worker`` finds the test worker."""
    folder = tmp_path_factory.mktemp("worker")
    (folder / "cecai_test_worker.py").write_text(_WORKER, encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


def _fail(worker_env: dict[str, str], job: dict[str, object]) -> WorkerFailed:
    with pytest.raises(WorkerFailed) as info:
        run_worker("cecai_test_worker", job, timeout=120, name="test worker", env=worker_env)
    return info.value


# --- the protocol ------------------------------------------------------------------------------------------------


def test_a_clean_result_comes_back_from_a_worker_in_its_own_process_group(worker_env: dict[str, str]) -> None:
    lines: list[str] = []
    job = {"do": "echo", "value": {"path": Path("/x/y.gguf"), "n": [1, 2.5, None]}}
    result = run_worker("cecai_test_worker", job, timeout=120, env=worker_env, on_line=lines.append)
    assert result.data["echo"] == {"path": "/x/y.gguf", "n": [1, 2.5, None]}  # paths travel as strings
    assert result.data["pgid"] == result.data["pid"] != os.getpid()  # it leads its own group
    assert "worker: echo" in result.tail and lines == ["worker: echo"]
    assert result.seconds > 0
    assert not Path(result.data["job"]).parent.exists(), "the job's temporary folder was left behind"


def test_a_job_that_is_not_json_is_refused_before_any_process_starts(worker_env: dict[str, str]) -> None:
    with pytest.raises(TypeError, match="only JSON values and paths"):
        run_worker("cecai_test_worker", {"do": "echo", "value": object()}, timeout=10, env=worker_env)


def test_a_crash_is_a_converter_error_with_llama_cpps_assertion(worker_env: dict[str, str]) -> None:
    error = _fail(worker_env, {"do": "abort"})
    assert isinstance(error, ConverterError) and error.exit_code == EXIT_FAILED
    assert error.kind == "crashed" and error.return_code == -signal.SIGABRT
    assert "SIGABRT" in error.reason and "test worker" in error.message
    assert error.summary == "ggml/src/ggml.c:12: GGML_ASSERT(n_dims > 0) failed"
    assert error.summary in error.message and "worker: abort" in error.output_tail


def test_an_exception_in_the_job_is_its_message_without_the_traceback(worker_env: dict[str, str]) -> None:
    error = _fail(worker_env, {"do": "raise"})
    assert error.kind == "failed" and error.return_code == 1 and error.exit_code == EXIT_FAILED
    assert error.reason == "ValueError: Failed to load model from file"
    assert "not within the file bounds" in error.summary and "Traceback" not in error.summary
    assert "Traceback" not in error.message
    assert "Traceback (most recent call last)" in error.output_tail  # the log keeps it for developers


def test_a_refused_job_is_a_usage_error(worker_env: dict[str, str]) -> None:
    error = _fail(worker_env, {"do": "usage"})
    assert error.kind == "usage" and error.exit_code == EXIT_USAGE and error.return_code == 2
    assert error.reason == "the text gave only 3 tokens"
    assert error.message == "test worker: the text gave only 3 tokens"


@pytest.mark.parametrize(
    ("what", "said"),
    [
        ("no-result", "exited without writing its result"),
        ("broken-result", "result file holds no result"),
        ("exit-3", "exited with status 3"),
    ],
)
def test_a_missing_or_malformed_result_is_a_crash(worker_env: dict[str, str], what: str, said: str) -> None:
    error = _fail(worker_env, {"do": what})
    assert error.kind == "crashed" and said in error.reason and said in error.message


def test_exit_statuses_in_words() -> None:
    assert "SIGKILL" in describe_exit(-9) and "killed" in describe_exit(-9)
    assert describe_exit(3) == "exited with status 3"
    assert "signal 99" in describe_exit(-99)


@needs_linux
@pytest.mark.parametrize("ignore_term", [False, True], ids=["grandchild", "grandchild-ignoring-SIGTERM"])
def test_a_timeout_stops_the_worker_and_everything_it_started(
    worker_env: dict[str, str],
    tmp_path: Path,
    reaper: list[int],
    monkeypatch: pytest.MonkeyPatch,
    ignore_term: bool,
) -> None:
    monkeypatch.setattr(processes, "_GRACE_S", 1.0)  # SIGKILL one second after SIGTERM, not five
    pidfile = tmp_path / "grandchild.pid"
    job = {"do": "sleep", "pidfile": str(pidfile), "ignore_term": ignore_term}
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        run_worker("cecai_test_worker", job, timeout=3, name="slow worker", env=worker_env)
    took = time.monotonic() - started
    grandchild = int(pidfile.read_text())
    reaper.append(grandchild)
    error = info.value
    assert error.kind == "timeout" and "slow worker" in error.message and "within 3 s" in error.message
    assert "worker: ready" in error.output_tail
    assert 3 <= took < 3 + 1.0 + 20, took
    assert _gone(grandchild), "the worker's own child outlived the timeout"


@needs_linux
def test_ctrl_c_stops_the_worker_and_everything_it_started(
    worker_env: dict[str, str], tmp_path: Path, reaper: list[int]
) -> None:
    pidfile = tmp_path / "grandchild.pid"

    def interrupt_when_ready(line: str) -> None:
        if line == "worker: ready":
            reaper.append(int(pidfile.read_text()))
            raise KeyboardInterrupt

    job = {"do": "sleep", "pidfile": str(pidfile), "ignore_term": True}
    with pytest.raises(KeyboardInterrupt):
        run_worker("cecai_test_worker", job, timeout=None, env=worker_env, on_line=interrupt_when_ready)
    assert reaper and _gone(reaper[0]), "a grandchild that ignores SIGTERM outlived Ctrl-C"


def test_serve_job_writes_its_reply_atomically(tmp_path: Path) -> None:
    job, result = tmp_path / "job.json", tmp_path / "result.json"
    job.write_text('{"n": 2}', encoding="utf-8")
    argv = ["--job", str(job), "--result", str(result)]
    assert serve_job(lambda j: {"double": j["n"] * 2}, argv) == 0
    assert result.read_text(encoding="utf-8") == '{"ok": true, "result": {"double": 4}}'

    def refuse(_job: object) -> dict[str, object]:
        raise WorkerUsage("too short")

    assert serve_job(refuse, argv) == 2
    assert '"kind": "usage"' in result.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json", "result.json"]  # no partial file left


# --- the real workers on a real GGUF -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    return convert_to_f32(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny.f32.gguf")


@pytest.mark.slow
def test_the_token_count_worker_counts_a_real_vocabulary(gguf: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The lighthouse keeper counted the ships. " * 20, encoding="utf-8")
    with_bos = count_tokens(gguf, text)
    without = count_tokens(gguf, text, add_special=False)
    assert isinstance(with_bos, int) and isinstance(without, int) and without > 20
    assert with_bos == without + 1  # the Llama vocabulary adds BOS


@pytest.mark.slow
def test_the_verification_worker_loads_real_files_and_names_a_broken_one(gguf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf.read_bytes()[:4096])  # the header is intact, the tensor data is missing
    check = load_check(gguf, threads=1)
    assert check.runtime == "cpu" and len(check.generated_tokens) == 8 and check.n_vocab > 0
    with pytest.raises(VerificationFailed) as info:
        load_check_many([gguf, broken], threads=1)
    assert "could not load broken.gguf" in info.value.message, info.value.message
    assert "tiny.f32.gguf" not in info.value.message


@pytest.mark.slow
def test_the_quantizer_worker_reports_llama_cpps_words_not_a_traceback(gguf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf.read_bytes()[:4096])
    dest = tmp_path / "out.q8_0.gguf"
    with pytest.raises(ConversionFailed) as info:
        quantize(broken, dest, PRECISIONS["Q8_0"], threads=1)
    message = info.value.message
    assert message.startswith("quantizing to Q8_0 failed (exit 1): "), message
    assert "Traceback" not in message and "llama_model_quantize returned" not in message, message
    assert "Traceback" in info.value.output_tail  # kept for the log
    assert not dest.exists()


def test_no_new_child_process_bypasses_run_tool() -> None:
    """``subprocess`` is started in processes.py alone (a line may say ``not run_tool: <why>`` to be let off)."""
    src = Path(processes.__file__).parent
    starts = ("subprocess.run(", "subprocess.Popen(", "subprocess.call(", "subprocess.check_", "os.system(")
    offenders = {
        str(path.relative_to(src))
        for path in sorted(src.rglob("*.py"))
        if path.name != "processes.py"
        for line in path.read_text(encoding="utf-8").splitlines()
        if any(s in line for s in starts) and "not run_tool:" not in line
    }
    assert not offenders, sorted(offenders)
