"""llama.cpp's command-line tools (``llama-imatrix``, ``llama-quantize``, ``llama-perplexity``…) from the pinned sdist.

:func:`build_tools` compiles any set of cmake targets of the llama.cpp tree vendored in the pinned llama-cpp-python
sdist (CPU only, portable: ``GGML_NATIVE=OFF``, static), into the toolchain cache, once. Later calls find the
executables and return at once.

The cache folder ``<cache>/llama.cpp-tools/<sdist stem>-cpu/`` keeps the extracted source (``src/``, extracted once
with :func:`.toolchain.extract_llama_cpp`), the cmake build tree (``build/``), the executables (``bin/``), the last
build's log (``build.log``) and what was built (``build.json``). Keeping the build tree means that a target asked
for later (the tests' ``llama-perplexity`` after the pipeline's ``llama-imatrix``) compiles only its own sources, a
minute instead of the first build's ten (2 cores). The price is about 250 MB of disk; delete the folder to reclaim it
(or to start over after a broken build).

The first build is long, so it says what it builds, where, and for about how long before it starts, and reports
cmake's progress while it runs (through the ``cecai.llama_programs`` logger, or a ``progress`` callback).

What it shares with the llama-cpp-python wheel, and why not more: both come from the one sdist file
(``toolchain.sdist_path``: downloaded once, checked against its SHA-256; ``./dev`` builds the wheel from that file, and
this extracts its vendored tree with ``toolchain.extract_llama_cpp``, as the converter files are). The wheel's cmake
tree cannot serve here: pip builds it in a temporary folder that it deletes once the wheel is made, as shared
libraries with the pair's flags, and with llama.cpp's tools left out (``LLAMA_BUILD_TOOLS`` is off when llama.cpp is
a subproject, as in llama-cpp-python's CMakeLists). Building the tools there would put them into the wheel and
change it. So llama.cpp is compiled a second time, here, once per sdist, statically and CPU only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TextIO

from . import toolchain
from .errors import ToolchainError, ToolNotFound
from .output import get_logger
from .processes import run_tool
from .toolchain import extract_llama_cpp

__all__ = ["CMAKE_ARGS", "TOOL_TARGETS", "build_tools", "tools_dir"]

_log = get_logger("llama_programs")

#: The targets :func:`build_tools` builds by default: the imatrix tool, and the reference quantizer (seconds more;
#: the tests check that the pipeline's quantization gives the same bytes as `llama-quantize --imatrix`).
TOOL_TARGETS: Final = ("llama-imatrix", "llama-quantize")
#: A CPU-only, portable, self-contained build of just the tools; nothing is downloaded.
CMAKE_ARGS: Final = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)
_STAMP: Final = "build.json"
_SOURCE_MARKER: Final = ".cecai-source.json"
_TAIL_CHARS: Final = 4000
# Progress lines: at most one per this many seconds, unless cmake moved this many percentage points.
_PROGRESS_EVERY_S: Final = 30.0
_PROGRESS_STEP_PCT: Final = 10
# "[ 42%] Building …" (Makefiles) or "[12/345] Building …" (Ninja).
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
_FRACTION = re.compile(r"^\[(\d+)/(\d+)\]")

_INSTALL_HINT: Final = (
    "install a C/C++ toolchain and cmake >= 3.14 (Debian/Ubuntu: `apt-get install cmake build-essential`; "
    "macOS: `xcode-select --install && brew install cmake`), or pass an existing imatrix file (IMATRIX: file)"
)


def tools_dir(sdist: Path, cache: Path) -> Path:
    """The cache folder of the tools built from ``sdist``: ``<cache>/llama.cpp-tools/<sdist stem>-cpu``."""
    return Path(cache) / "llama.cpp-tools" / f"{_sdist_stem(Path(sdist))}-cpu"


def build_tools(
    *,
    sdist: Path | None = None,
    cache: Path | None = None,
    targets: Sequence[str] = TOOL_TARGETS,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Build llama.cpp's tools from the pinned sdist once; return ``target name → executable``.

    Args:
        sdist: the llama-cpp-python sdist tarball (default: ``toolchain.sdist_path()``, fetched and verified).
        cache: the cache root (default: ``toolchain.cache_root()``); see :func:`tools_dir`.
        targets: cmake targets to build (``llama-imatrix``, ``llama-quantize``, ``llama-perplexity``…).
        jobs: parallel compile jobs (default: the number of CPUs).
        progress: where the announcement and progress lines go (default: the ``cecai.llama_programs`` logger, INFO,
            which the CLI prints on stderr).

    Raises:
        ToolNotFound: cmake or a C++ compiler is missing.
        ToolchainError: the sdist lacks the vendored llama.cpp, or the build failed (the message keeps the tail
            of the build log, whose path it names).
    """
    if sdist is None or cache is None:
        sdist = toolchain.sdist_path() if sdist is None else sdist
        cache = toolchain.cache_root() if cache is None else cache
    say = progress or _log.info
    sdist = Path(sdist)
    root = tools_dir(sdist, Path(cache))
    wanted = tuple(dict.fromkeys(targets))
    found = _built(root, wanted)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    with _lock(
        root / ".lock", on_wait=lambda: say(f"waiting for another process building llama.cpp's tools in {root}")
    ):
        found = _built(root, wanted)  # another process may have built them while we waited
        if found is not None:
            return found
        _check_build_tools()
        for stale in root.glob("build-*"):  # temporary trees of older versions, left by interrupted builds
            shutil.rmtree(stale, ignore_errors=True)
        n_jobs = jobs or os.cpu_count() or 2
        build_dir = root / "build"
        log_file = root / "build.log"
        first = not (build_dir / "CMakeCache.txt").is_file()
        estimate = (
            # measured: 10.5 minutes with 2 jobs on a quiet machine, 14 on a busy one
            f"the first build compiles llama.cpp: about {max(1, 20 // n_jobs)}-{max(2, 40 // n_jobs)} minutes "
            f"with {n_jobs} jobs"
            if first
            else "the llama.cpp libraries are already built: about a minute"
        )
        say(
            f"building {', '.join(wanted)} from {sdist.name} in {root} (once; cached afterwards). "
            f"{estimate}; full log: {log_file}"
        )
        start = time.monotonic()
        src = _source_tree(sdist, root)
        configure = ["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_ARGS]
        build = ["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(n_jobs)]
        for target in wanted:
            build += ["--target", target]
        with log_file.open("w", encoding="utf-8") as log:
            for cmd in (configure, build):
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                code = _run_logged(cmd, log, say if cmd is build else None)
                if code != 0:
                    raise ToolchainError(
                        f"building {', '.join(wanted)} from {sdist.name} failed "
                        f"(`{cmd[0]} {cmd[1]}` exited with {code}); full log: {log_file}\n"
                        f"--- build log (tail) ---\n{_tail(log_file)}",
                        hint="check the compiler error above; a C++17 compiler and cmake >= 3.14 are needed "
                        f"(to start from scratch, delete {root}). Or give a ready imatrix file (IMATRIX: file) "
                        "to skip the build.",
                    )
        bin_dir = root / "bin"
        bin_dir.mkdir(exist_ok=True)
        for target in wanted:
            exe = _find_executable(build_dir, target)
            if exe is None:
                raise ToolchainError(
                    f"the build finished but produced no {target} executable; log: {log_file}",
                    hint="the vendored llama.cpp may have renamed the target; check `cmake --build . --target help`",
                )
            tmp_exe = bin_dir / f".{exe.name}.tmp"
            shutil.copy2(exe, tmp_exe)
            tmp_exe.replace(bin_dir / exe.name)
        elapsed = round(time.monotonic() - start, 1)
        stamp = {
            "sdist": sdist.name,
            "targets": sorted({*_stamp_targets(root), *wanted}),
            "cmake_args": list(CMAKE_ARGS),
            "build_s": elapsed,
        }
        (root / _STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
        say(f"built {', '.join(wanted)} in {elapsed:.0f} s")
        found = _built(root, wanted)
        assert found is not None
        return found


def _source_tree(sdist: Path, root: Path) -> Path:
    """``root/src``: the vendored llama.cpp, extracted once (atomically: a marker is written last)."""

    src = root / "src"
    try:
        if json.loads((src / _SOURCE_MARKER).read_text(encoding="utf-8")).get("sdist") == sdist.name:
            return src
    except (OSError, ValueError, AttributeError):
        pass
    staging = Path(tempfile.mkdtemp(prefix=".src-", dir=root))
    try:
        extract_llama_cpp(sdist, staging)
        (staging / _SOURCE_MARKER).write_text(json.dumps({"sdist": sdist.name}), encoding="utf-8")
        if src.exists():
            shutil.rmtree(src)
        # A build tree configured for another source would not notice the swap: start it over.
        shutil.rmtree(root / "build", ignore_errors=True)
        os.replace(staging, src)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return src


def _run_logged(cmd: list[str], log: TextIO, say: Callable[[str], None] | None) -> int:
    """Run ``cmd`` with its output into ``log``; pass cmake's progress to ``say``, throttled."""
    shown = {"pct": -_PROGRESS_STEP_PCT, "at": time.monotonic()}

    def on_line(line: str) -> None:
        log.write(line + "\n")
        pct = _percent(line)
        if say is None or pct is None:
            return
        now = time.monotonic()
        if pct >= shown["pct"] + _PROGRESS_STEP_PCT or (pct != shown["pct"] and now - shown["at"] >= _PROGRESS_EVERY_S):
            say(f"  llama.cpp build: {pct:3d}%  {line.split('] ', 1)[-1].strip()[:100]}")
            shown["pct"], shown["at"] = pct, now

    run = run_tool(cmd, on_line=on_line)
    log.flush()  # an error message quotes the log's tail next
    return run.returncode


def _percent(line: str) -> int | None:
    match = _PERCENT.match(line)
    if match:
        return int(match.group(1))
    match = _FRACTION.match(line)
    if match and int(match.group(2)) > 0:
        return 100 * int(match.group(1)) // int(match.group(2))
    return None


def _sdist_stem(sdist: Path) -> str:
    name = sdist.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return sdist.stem


def _exe_name(target: str) -> str:
    return f"{target}.exe" if os.name == "nt" else target


def _stamp(root: Path) -> dict[str, object]:
    try:
        data = json.loads((root / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stamp_targets(root: Path) -> list[str]:
    stamp = _stamp(root)
    targets = stamp.get("targets")
    # Tools built with other flags are not these tools: build them again.
    if not isinstance(targets, list) or stamp.get("cmake_args", list(CMAKE_ARGS)) != list(CMAKE_ARGS):
        return []
    return [str(t) for t in targets]


def _built(root: Path, targets: Sequence[str]) -> dict[str, Path] | None:
    done = set(_stamp_targets(root))
    paths = {t: root / "bin" / _exe_name(t) for t in targets}
    if all(t in done and os.access(p, os.X_OK) for t, p in paths.items()):
        return paths
    return None


def _check_build_tools() -> None:
    if shutil.which("cmake") is None:
        raise ToolNotFound("cmake is needed to build llama.cpp's tools but is not on PATH", hint=_INSTALL_HINT)
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        raise ToolNotFound(
            "a C++ compiler is needed to build llama.cpp's tools but none is on PATH", hint=_INSTALL_HINT
        )


def _find_executable(build_dir: Path, target: str) -> Path | None:
    name = _exe_name(target)
    for candidate in (build_dir / "bin" / name, build_dir / "bin" / "Release" / name):
        if candidate.is_file():
            return candidate
    return next((p for p in build_dir.rglob(name) if p.is_file()), None)


@contextlib.contextmanager
def _lock(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    try:
        import fcntl  # POSIX only
    except ImportError:  # pragma: no cover - Windows: no lock, builds are rare there
        yield
        return
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()  # a build can take minutes: say why nothing happens
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail(path: Path, chars: int = _TAIL_CHARS) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-chars:].decode("utf-8", "replace").strip()
