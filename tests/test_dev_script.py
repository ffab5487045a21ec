"""./dev and its helper scripts/lib/dev_install.py: the shell is valid, torch's CPU build is chosen where the PyTorch
CPU index answers (a local http.server stands in for it; a closed port for an unreachable one), what pip would
download otherwise is listed, and a long build prints its progress."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_module, require_program

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "scripts" / "lib" / "dev_install.py"
sys.path.insert(0, str(HELPER.parent))
import dev_install  # noqa: E402 (a script's module, found through the path above)

PIN = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]


@pytest.fixture
def index(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local stand-in for a package index: (base URL, the folder it serves)."""
    root = tmp_path / "index"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output to the test's own."""


def _unreachable_url() -> str:
    """A local URL nothing listens on."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}/whl/cpu"


def _torch_page(root: Path, *versions: str) -> None:
    (root / "torch").mkdir(exist_ok=True)
    links = "".join(f'<a href="torch-{v}%2Bcpu-cp311-cp311-linux_x86_64.whl">torch-{v}+cpu</a>\n' for v in versions)
    (root / "torch" / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An environment without torch (and without pip: the helper's pip acts on it through --python)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python"


def _helper(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HELPER), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


# -- the shell scripts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["dev", ".ci/run"])
def test_shell_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = require_program("shellcheck", "shellcheck")
    proc = subprocess.run(
        [shellcheck, "dev", ".ci/run", "scripts/dev-clean.sh", "scripts/start-podman.sh", "actions/install.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout


def test_dev_shows_pip_and_decides_torch_before_installing() -> None:
    dev = (ROOT / "dev").read_text()
    installs = [line for line in dev.splitlines() if "pip install" in line or "pip wheel" in line]
    assert installs, "./dev installs with pip"
    for line in installs:
        assert not re.search(r"\s(--quiet|-q)\b", line), f"pip's progress is hidden: {line.strip()}"
    assert "pip wheel -v" in dev, "the llama-cpp-python build shows cmake's output (in its log)"
    assert dev.index("dev_install.py heartbeat") < dev.index("pip wheel -v")
    # One sdist for everything: the wheel is built from the file the toolchain downloaded and checked.
    fetch = next(line for line in dev.splitlines() if "sdist_path()" in line)
    assert 'pip wheel -v --no-deps -w "$WHEELS" "$sdist"' in dev and dev.index(fetch) < dev.index("pip wheel -v")
    code = re.search(r"python -c '([^']+)'", fetch).group(1)  # type: ignore[union-attr]
    # It runs before anything is installed: the standard library alone (-S: no site-packages) must do.
    probe = code.replace("sdist_path()", "sdist_path.__name__")
    proc = subprocess.run(
        [sys.executable, "-S", "-c", probe], env={"PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "sdist_path", proc.stderr
    # The project's own install: pip -q, then one line naming what it installed (not ~60 "already satisfied").
    assert dev.index("dev_install.py torch") < dev.index('dev_install.py install -- --find-links "$WHEELS" -e')


def test_dev_without_a_command_prints_its_usage() -> None:
    proc = subprocess.run([str(ROOT / "dev")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "./dev demo" in proc.stderr and "./dev test" in proc.stderr


# -- which torch ----------------------------------------------------------------------------------------------------
def test_the_pin_is_pyprojects() -> None:
    assert dev_install.torch_pin(ROOT / "pyproject.toml") == PIN


@pytest.mark.parametrize(
    ("installed", "system", "machine", "unreachable", "action"),
    [
        (f"{PIN}+cpu", "linux", "x86_64", None, "present"),
        (PIN, "linux", "x86_64", "down", "present"),
        (None, "linux", "x86_64", None, "cpu-index"),
        (None, "linux", "aarch64", None, "cpu-index"),
        ("2.0.0", "linux", "x86_64", None, "cpu-index"),
        (None, "linux", "x86_64", "https://download.pytorch.org/whl/cpu/torch/ is not reachable", "package-index"),
        (None, "darwin", "arm64", None, "package-index"),
    ],
)
def test_choose(installed: str | None, system: str, machine: str, unreachable: str | None, action: str) -> None:
    plan = dev_install.choose(PIN, installed, system, machine, unreachable)
    assert plan.action == action
    if action == "package-index" and unreachable:
        assert plan.reason == unreachable


def test_probe_answers_only_for_an_index_that_lists_the_pin(index: tuple[str, Path]) -> None:
    url, root = index
    assert dev_install.probe(url, PIN) == f"{url}/torch/ answered HTTP 404"
    _torch_page(root, "2.0.0")
    assert dev_install.probe(url, PIN) == f"{url}/torch/ lists no torch {PIN}"
    _torch_page(root, "2.0.0", PIN)
    assert dev_install.probe(url + "/", PIN) is None
    down = _unreachable_url()
    assert dev_install.probe(down, PIN) == f"{down}/torch/ is not reachable ([Errno 111] Connection refused)"


def test_dry_run_installs_from_a_reachable_cpu_index(index: tuple[str, Path], bare_venv: Path) -> None:
    url, root = index
    _torch_page(root, PIN)
    proc = _helper("torch", "--dry-run", "--python", str(bare_venv), env={"CECAI_TORCH_INDEX_URL": url})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    if (sys.platform, dev_install.platform.machine().lower()) not in dev_install.CPU_INDEX_PLATFORMS:
        pytest.skip("the CPU index is only used on x86-64 and aarch64 Linux")
    assert plan["action"] == "cpu-index"
    assert plan["command"][-3:] == [f"torch=={PIN}", "--index-url", url]
    assert plan["command"][:5] == [sys.executable, "-m", "pip", "--python", str(bare_venv)]


def test_dry_run_falls_back_to_the_package_index_when_the_cpu_index_is_down(bare_venv: Path) -> None:
    down = _unreachable_url()
    proc = _helper("torch", "--dry-run", "--python", str(bare_venv), env={"CECAI_TORCH_INDEX_URL": down})
    plan = json.loads(proc.stdout)
    if (sys.platform, dev_install.platform.machine().lower()) not in dev_install.CPU_INDEX_PLATFORMS:
        pytest.skip("the CPU index is only used on x86-64 and aarch64 Linux")
    assert plan == {"action": "package-index", "pin": PIN, "command": None, "reason": plan["reason"]}
    assert plan["reason"].startswith(f"{down}/torch/ is not reachable")


def test_an_installed_pin_is_left_alone() -> None:
    require_module("torch", "torch")
    proc = _helper("torch", "--dry-run")
    plan = json.loads(proc.stdout)
    assert plan["action"] == "present" and plan["command"] is None, plan


@pytest.mark.slow
def test_a_down_cpu_index_lists_what_pip_would_fetch_and_installs_nothing(bare_venv: Path) -> None:
    """pip's real resolution of the pin, with this machine's pip configuration (here: a CPU wheel on local disk)."""
    proc = _helper("torch", "--python", str(bare_venv), env={"CECAI_TORCH_INDEX_URL": _unreachable_url()})
    assert proc.returncode == 0, proc.stderr
    assert "is not reachable" in proc.stdout and f"pip will take torch=={PIN}" in proc.stdout
    assert re.search(rf"^    torch {re.escape(PIN)}\S*  \(", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^    \d+ packages: \d+ from local files, \d+ to download", proc.stdout, re.MULTILINE)
    assert not list(bare_venv.parent.parent.glob("lib/python*/site-packages/torch")), "a dry run installs nothing"


def test_a_cuda_torch_download_is_named_with_its_size(index: tuple[str, Path]) -> None:
    url, root = index
    (root / "torch-x-cp311-linux_x86_64.whl").write_bytes(b"t" * 300_000)
    (root / "nvidia_cublas_cu12-x.whl").write_bytes(b"n" * 200_000)
    report = {
        "install": [
            {
                "metadata": {"name": "torch", "version": PIN},
                "download_info": {"url": f"{url}/torch-x-cp311-linux_x86_64.whl"},
            },
            {
                "metadata": {"name": "nvidia-cublas-cu12", "version": "1"},
                "download_info": {"url": f"{url}/nvidia_cublas_cu12-x.whl"},
            },
            {"metadata": {"name": "sympy", "version": "1"}, "download_info": {"url": f"file://{root}/missing.whl"}},
        ]
    }
    lines = dev_install.describe_downloads(report)
    assert lines[0] == f"    torch {PIN}  (127.0.0.1:{url.rsplit(':', 1)[1]}, 0.3 MB)"
    assert "    3 packages: 1 from local files, 2 to download (0.5 MB)" in lines
    assert any(
        line.startswith("WARNING: this is PyPI's CUDA build of torch, with 1 nvidia-* packages") for line in lines
    )
    assert dev_install.describe_downloads({"install": []}) == ["    pip has nothing to install for torch"]


def test_a_cpu_torch_download_gets_no_warning(index: tuple[str, Path]) -> None:
    url, root = index
    (root / "torch.whl").write_bytes(b"t" * 1000)
    report = {
        "install": [{"metadata": {"name": "torch", "version": PIN}, "download_info": {"url": f"{url}/torch.whl"}}]
    }
    lines = dev_install.describe_downloads(report)
    assert not any("WARNING" in line for line in lines)
    assert lines[-1] == "    1 packages: 0 from local files, 1 to download (1 kB)"


# -- progress of a long build ------------------------------------------------------------------------------------
_BUILD = (
    "import sys, time\n"
    "for i in (1, 2, 3):\n"
    "    print(f'[{i}/3] Building CXX object ggml-{i}.o', flush=True)\n"
    "    time.sleep(0.6)\n"
)


def test_heartbeat_prints_elapsed_time_and_the_latest_step(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    proc = _helper(
        "heartbeat", "--every", "0.25", "--what", "test build", "--log", str(log), "--", sys.executable, "-c", _BUILD
    )
    assert proc.returncode == 0, proc.stderr
    beats = re.findall(r"^    \.\.\. \d+m\d\ds  \[(\d)/3\] ggml-\1\.o$", proc.stdout, re.MULTILINE)
    assert len(beats) >= 3 and beats == sorted(beats), proc.stdout
    assert f"test build: output in {log}" in proc.stdout
    assert re.search(r"^    test build: done in \d+m\d\ds$", proc.stdout, re.MULTILINE)
    assert log.read_text().count("Building CXX object") == 3


def test_heartbeat_shows_the_log_tail_and_exit_status_of_a_failed_build(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    failing = (
        "import sys\nprint('[1/9] Building C object a.o')\nprint('error: no compiler', file=sys.stderr)\nsys.exit(3)"
    )
    proc = _helper("heartbeat", "--what", "test build", "--log", str(log), "--", sys.executable, "-c", failing)
    assert proc.returncode == 3
    assert "error: no compiler" in proc.stderr
    assert (
        re.search(r"error: test build failed after \d+m\d\ds ", proc.stderr)
        and f"(exit 3); the whole output is in {log}" in proc.stderr
    )


def test_heartbeat_needs_a_command() -> None:
    proc = _helper("heartbeat", "--log", "/dev/null", "--")
    assert proc.returncode == 2 and "needs a command" in proc.stderr


def test_the_progress_line_is_the_step_counter_and_the_file(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    ninja = "  [10/193] /usr/bin/g++ -DGGML_BUILD -O3 -o ggml/gguf.cpp.o -c /tmp/pip-wheel-x/vendor/ggml/src/gguf.cpp"
    log.write_text(f"Collecting llama-cpp-python\n{ninja}\n  note: a line after the step\n")
    assert dev_install._latest_progress(log) == "[10/193] gguf.cpp"
    log.write_text("[ 45%] Building CXX object vendor/llama.cpp/src/CMakeFiles/llama.dir/llama.cpp.o\n")
    assert dev_install._latest_progress(log) == "[ 45%] llama.cpp.o"
    log.write_text("  Running command Building wheel for llama-cpp-python (pyproject.toml)\n")
    assert dev_install._latest_progress(log) == "Running command Building wheel for llama-cpp-python (pyproject.toml)"


def test_the_readme_set_up_is_these_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Set-up: two commands") :]
    block = block[block.index("```sh\n") + 6 : block.index("```", block.index("```sh\n") + 6)]
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["./dev demo", "./dev test"]
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec ./dev test")


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal real wheel (pure Python, no code) that pip installs."""
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


def test_install_names_what_pip_installed_and_nothing_else(tmp_path: Path) -> None:
    """`./dev`'s project install: pip -q and one line from its --report (a real pip, a real wheel, no index)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "cecai-probe", "1.2.3")
    args = ["--no-index", "--find-links", str(wheels), "--target", str(tmp_path / "site")]
    proc = _helper("install", "--", *args, "cecai-probe")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["    pip installed 1 package(s): cecai-probe 1.2.3"]
    assert (tmp_path / "site" / "cecai_probe-1.2.3.dist-info" / "METADATA").is_file()
    # Everything already there (pytest is in this environment): one line, not "Requirement already satisfied"s.
    proc = _helper("install", "--", "--no-index", "pytest")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["    pip installed nothing: every requirement was already satisfied"]
    assert "already satisfied" not in proc.stderr.lower().replace("every requirement was already satisfied", "")


def test_install_passes_pips_failure_on() -> None:
    proc = _helper("install", "--", "--no-index", "cecai-no-such-package-anywhere")
    assert proc.returncode == 1
    assert "cecai-no-such-package-anywhere" in proc.stderr and proc.stdout == ""


def test_install_describes_an_editable_install() -> None:
    report = {
        "install": [
            {"metadata": {"name": "cecai-converter", "version": "0.1.0"},
             "download_info": {"url": "file:///w", "dir_info": {"editable": True}}},
            {"metadata": {"name": "docker", "version": "7.1.0"}, "download_info": {"url": "https://x/docker.whl"}},
        ]
    }  # fmt: skip
    assert dev_install.describe_install(report) == (
        "    pip installed 2 package(s): cecai-converter 0.1.0 (editable), docker 7.1.0"
    )


def _fake_podman(bin_dir: Path, calls: Path) -> None:
    """A `podman` stand-in: it records its arguments and answers what dev-clean.sh asks."""
    bin_dir.mkdir()
    podman = bin_dir / "podman"
    podman.write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%s\\n' \"$*\" >> '{calls}'\n"
        'case "$*" in\n'
        '  "ps -aq --filter label=io.cecai.converter") echo c1 ;;\n'
        '  "images -q --filter label=io.cecai.pair") printf "i1\\ni1\\n" ;;\n'
        '  "image inspect localhost/debian-python:bookworm") exit 0 ;;\n'
        '  "image inspect "*) exit 1 ;;\n'
        "esac\n"
    )
    podman.chmod(0o755)


def test_dev_clean_removes_what_dev_test_left_and_only_that(tmp_path: Path) -> None:
    """The service start-podman.sh started (found by its pid file and its command line), the containers.conf it
    wrote, the project's containers and images; the caches only with --caches."""
    calls = tmp_path / "calls"
    _fake_podman(tmp_path / "bin", calls)
    socket = tmp_path / "podman.sock"
    service = subprocess.Popen(["bash", "-c", f'exec -a "podman system service --time=0 unix://{socket}" sleep 60'])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        Path(f"{socket}.pid").write_text(f"{service.pid}\n")
        socket.write_text("")
        conf = tmp_path / "containers.conf"
        conf.write_text("# written by cecai-converter's scripts/start-podman.sh (this line marks it)\n[engine]\n")
        cache = tmp_path / "home" / ".cache" / "cecai-converter" / "wheels"
        cache.mkdir(parents=True)
        env = {
            "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path / "home"),
            "CECAI_PODMAN_SOCKET": str(socket),
            "CECAI_CONTAINERS_CONF": str(conf),
        }
        proc = subprocess.run([str(ROOT / "dev"), "clean"], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert service.wait(timeout=15) is not None, "the service is stopped"
        assert bystander.poll() is None
        assert not Path(f"{socket}.pid").exists() and not socket.exists() and not conf.exists()
        assert calls.read_text().splitlines() == [
            "ps -aq --filter label=io.cecai.converter",
            "rm -f c1",
            "images -q --filter label=io.cecai.pair",
            "image inspect localhost/debian-python:bookworm",
            "image inspect localhost/debian-python-arm64:bookworm",
            "rmi -f i1 localhost/debian-python:bookworm",
            "image prune -f",
        ]
        assert cache.is_dir() and "./dev clean --caches removes it" in proc.stdout
        # A containers.conf of someone else's, and a pid file naming another process: both left alone.
        conf.write_text("[engine]\n")
        Path(f"{socket}.pid").write_text(f"{bystander.pid}\n")
        proc = subprocess.run(
            [str(ROOT / "dev"), "clean", "--caches"], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert bystander.poll() is None and conf.read_text() == "[engine]\n"
        assert not (tmp_path / "home" / ".cache" / "cecai-converter").exists()
        bad = subprocess.run([str(ROOT / "dev"), "clean", "--all"], env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and "usage: ./dev clean" in bad.stderr
    finally:
        for process in (service, bystander):
            process.kill()
            process.wait()
