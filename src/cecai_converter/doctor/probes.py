"""doctor's probes of the runner itself, each giving a :class:`Finding`: Python and ``venv``, the C/C++ compilers
(a small program compiled and linked), cmake, the CUDA compiler, the GPU (``nvidia-smi -L``, a Jetson's L4T release
file) and the free disk by its rule (:func:`disk_needed`, sizes read by :func:`parse_size`). Standard library only."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from ..errors import UsageError
from ..output import decimal_size
from ..pairs import PairInfo

#: The oldest Python the package supports (pyproject's requires-python; a test keeps them equal).
MIN_PYTHON: Final = (3, 10)
#: llama.cpp's cmake_minimum_required.
MIN_CMAKE: Final = (3, 14)
#: Free disk: (times the model size, fixed bytes), by role. See the package's docstring for what each part holds.
BUILDER_DISK: Final = (4, 3 * 10**9)
CHECK_DISK: Final = (2, 1 * 10**9)
#: How long one probe (a compiler, nvidia-smi, an engine request) may take before it counts as not answering.
PROBE_TIMEOUT_S: Final = 60.0
#: L4T's release file: present on every Jetson flashed with JetPack.
_TEGRA_RELEASE: Final = Path("/etc/nv_tegra_release")

Status = Literal["ok", "missing", "unchecked", "skipped"]


@dataclass(frozen=True)
class Finding:
    """The result of one check.

    Attributes:
        check: what was checked (``cmake``, ``container engine``…).
        status: ``ok``, ``missing`` (the runner lacks it: ``fix`` says what to do), ``unchecked`` (it could not
            be checked here: ``detail`` says why) or ``skipped`` (``--skip``).
        detail: what was found, or what is wrong.
        fix: how to get the missing piece (empty when ok).
    """

    check: str
    status: Status
    detail: str
    fix: str = ""


# -- sizes -----------------------------------------------------------------------------------------------------------
_UNITS: Final = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A size as people write it: ``7GB``, ``7 G``, ``1.5GiB``, ``800MB``, ``123456`` (bytes).

    K, M, G, T (with or without B) are decimal, as the project prints sizes; KiB, MiB, GiB, TiB are binary.

    Raises:
        UsageError: not a size.
    """
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(
            f"--model-size {text!r} is not a size",
            hint="give the model's weights size, e.g. 16GB, 1.5GiB or 800MB (decimal K/M/G/T, binary KiB/MiB/GiB)",
        )
    return int(float(match.group(1)) * _UNITS[unit])


def _gb(n: float) -> str:
    """Bytes in the project's size unit (decimal)."""
    return decimal_size(n)


def disk_needed(role: str, model_bytes: int | None) -> int:
    """The free bytes a runner of ``role`` needs for a model of ``model_bytes`` (None: the fixed part only)."""
    factor, fixed = BUILDER_DISK if role == "builder" else CHECK_DISK
    return factor * (model_bytes or 0) + fixed


# -- the probes ------------------------------------------------------------------------------------------------------
def _run(argv: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run a probe; (exit status, stdout and stderr). A missing program or a timeout is status 127 / 124."""
    try:
        proc = subprocess.run(  # not run_tool: doctor runs before install (stdlib only); short probes, own timeout
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} did not finish in {PROBE_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return 126, f"{argv[0]}: {exc.strerror or exc}"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _error_line(text: str) -> str:
    """A compiler's first error line (``cc: fatal error: cannot execute 'as'``), else its last line."""
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()[:300]
    return _last_line(text)


def check_python() -> Finding:
    """The interpreter running this is recent enough."""
    version = ".".join(map(str, sys.version_info[:3]))
    where = f"Python {version} ({sys.executable})"
    if sys.version_info[:2] >= MIN_PYTHON:
        return Finding("python", "ok", where)
    need = ".".join(map(str, MIN_PYTHON))
    return Finding(
        "python",
        "missing",
        f"{where} is older than {need}",
        f"install Python >= {need} (Debian/Ubuntu: `sudo apt-get install python3`; or actions/setup-python) and "
        "give it as the action's `python` input",
    )


def check_venv() -> Finding:
    """``python -m venv`` works: the venv module and ensurepip (Debian splits both into python3-venv)."""
    absent = [name for name in ("venv", "ensurepip") if importlib.util.find_spec(name) is None]
    if not absent:
        return Finding("python venv", "ok", f"venv and ensurepip importable in {sys.executable}")
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return Finding(
        "python venv",
        "missing",
        f"{' and '.join(absent)} cannot be imported by {sys.executable}, so `python -m venv` fails",
        f"Debian/Ubuntu: `sudo apt-get install python3-venv` (or `{minor}-venv`)",
    )


_CXX_PROGRAM: Final = "#include <vector>\nint main() { std::vector<int> v{1}; return v[0] - 1; }\n"
_C_PROGRAM: Final = "#include <stdio.h>\nint main(void) { return 0; }\n"


def _compiler(env_name: str, candidates: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The compiler a build would use: $CC/$CXX when set, else the first candidate on PATH."""
    chosen = environ.get(env_name)
    if chosen:
        return shutil.which(chosen.split()[0], path=environ.get("PATH")) or None
    for name in candidates:
        found = shutil.which(name, path=environ.get("PATH"))
        if found:
            return found
    return None


def check_compilers(environ: Mapping[str, str]) -> Finding:
    """A C and a C++17 compiler that really compile and link a small program (headers and libstdc++ included)."""
    fix = (
        "Debian/Ubuntu: `sudo apt-get install build-essential`; Fedora/RHEL: `sudo dnf install gcc gcc-c++`; "
        "or set CC and CXX to working compilers"
    )
    cc = _compiler("CC", ("cc", "gcc", "clang"), environ)
    cxx = _compiler("CXX", ("c++", "g++", "clang++"), environ)
    if cc is None or cxx is None:
        which = " and ".join(n for n, c in (("C (cc, gcc, clang; $CC)", cc), ("C++ (c++, g++, clang++; $CXX)", cxx))
                             if c is None)  # fmt: skip
        return Finding("C/C++ compiler", "missing", f"no {which} compiler on PATH", fix)
    with tempfile.TemporaryDirectory(prefix="cecai-doctor-") as tmp:
        for compiler, lang, program, extra in ((cc, "c", _C_PROGRAM, []), (cxx, "c++", _CXX_PROGRAM, ["-std=c++17"])):
            status, text = _run(
                [compiler, "-x", lang, *extra, "-", "-o", str(Path(tmp, "probe"))], stdin=program, env=environ
            )
            if status != 0:
                return Finding(
                    "C/C++ compiler",
                    "missing",
                    f"{compiler} cannot compile a small {lang.upper()} program: {_error_line(text)}",
                    fix,
                )
    return Finding("C/C++ compiler", "ok", f"{cc} and {cxx} (C++17) compile and link")


def check_cmake(environ: Mapping[str, str]) -> Finding:
    """cmake on PATH, new enough for llama.cpp."""
    need = ".".join(map(str, MIN_CMAKE))
    fix = f"Debian/Ubuntu: `sudo apt-get install cmake`; or `pipx install cmake` (>= {need}, on PATH)"
    found = shutil.which("cmake", path=environ.get("PATH"))
    if found is None:
        return Finding("cmake", "missing", "cmake is not on PATH (llama.cpp's tools are built with it)", fix)
    status, text = _run([found, "--version"], env=environ)
    match = re.search(r"version (\d+)\.(\d+)", text)
    if status != 0 or match is None:
        return Finding("cmake", "missing", f"{found} --version failed: {_last_line(text)}", fix)
    version = (int(match.group(1)), int(match.group(2)))
    if version < MIN_CMAKE:
        return Finding("cmake", "missing", f"{found} is cmake {version[0]}.{version[1]}, older than {need}", fix)
    return Finding("cmake", "ok", f"{found} (cmake {version[0]}.{version[1]})")


def check_disk(role: str, model_bytes: int | None, path: Path) -> Finding:
    """Free space where the runner works, against :func:`disk_needed`."""
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent  # the folder may not exist yet: its file system is the nearest existing ancestor's
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Finding("disk", "unchecked", f"cannot read the free space of {where}: {exc.strerror or exc}")
    need = disk_needed(role, model_bytes)
    factor, fixed = BUILDER_DISK if role == "builder" else CHECK_DISK
    rule = (
        f"{factor} × the {_gb(model_bytes)} model + {_gb(fixed)}"
        if model_bytes
        else f"the fixed part only; --model-size adds {factor} × the model's size"
    )
    detail = f"{_gb(free)} free at {path}; a {role} runner needs {_gb(need)} ({rule})"
    if free >= need:
        return Finding("disk", "ok", detail)
    return Finding(
        "disk",
        "missing",
        detail,
        f"free {_gb(need - free)} at {path} (remove old outputs, `./dev clean`, `docker system prune`), "
        "or work on a larger disk",
    )


def check_gpu(pair: PairInfo, environ: Mapping[str, str]) -> Finding:
    """The pair's GPU is visible: ``nvidia-smi -L`` lists one (on a Jetson, L4T's release file also counts)."""
    status, text = _run(["nvidia-smi", "-L"], env=environ)
    gpus = [line for line in text.splitlines() if line.startswith("GPU ")]
    if status == 0 and gpus:
        return Finding("GPU", "ok", f"{len(gpus)} visible: {gpus[0][:200]}")
    if pair.accelerator == "jetson":
        if _TEGRA_RELEASE.is_file():
            release = _TEGRA_RELEASE.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
            return Finding("GPU", "ok", f"a Jetson: {_TEGRA_RELEASE}: {(release or [''])[0][:200]}")
        return Finding(
            "GPU",
            "missing",
            f"{pair.name} runs on a Jetson AGX Orin, but neither {_TEGRA_RELEASE} nor a GPU in `nvidia-smi -L` is here",
            "run this job on the Orin, flashed with JetPack 6 (L4T r36)",
        )
    why = "nvidia-smi is not on PATH" if status == 127 else (_last_line(text) or "it lists no GPU")
    return Finding(
        "GPU",
        "missing",
        f"{pair.name} needs an NVIDIA GPU: `nvidia-smi -L` failed ({why})",
        "install the NVIDIA driver (`nvidia-smi -L` must list the GPU), or route the job to a runner with one "
        f"(labels: {', '.join(pair.runner_labels)})",
    )


def _cuda_compiler(pair: PairInfo) -> str | None:
    for arg in pair.cmake_args:
        if arg.startswith("-DCMAKE_CUDA_COMPILER="):
            return arg.partition("=")[2]
    return None


def check_nvcc(pair: PairInfo) -> Finding:
    """The CUDA compiler the pair's llama-cpp-python build names (``-DCMAKE_CUDA_COMPILER``) exists."""
    nvcc = _cuda_compiler(pair) or "nvcc"
    if shutil.which(nvcc):
        return Finding("CUDA compiler", "ok", f"{nvcc} (the pair's -DCMAKE_CUDA_COMPILER)")
    fix = (
        "JetPack 6 ships it under /usr/local/cuda (`sudo apt-get install nvidia-jetpack`)"
        if pair.accelerator == "jetson"
        else "install the CUDA toolkit 12.x (`sudo apt-get install cuda-toolkit-12-6`) so that it is there, "
        "or use --backend docker (the pair's image has it)"
    )
    return Finding("CUDA compiler", "missing", f"{nvcc} is not there: the {pair.name} runtime is compiled with it", fix)
