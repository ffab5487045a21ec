"""``cecai-convert doctor``: does this runner have what its role and pair need? Checked before any work starts.

A *builder* (the ``make`` jobs, the convert action) converts on the runner itself: Python with ``venv``, a C/C++
compiler and cmake (llama-cpp-python's wheel and llama.cpp's tools are compiled there), and disk for the model. A
*check* runner (the ``check`` jobs, the check action) runs the pair's image: a container engine that answers, the
pair's image (present, or in its registry), and for the GPU and Jetson pairs a visible GPU and the NVIDIA container
runtime. ``--backend`` swaps the two ways of running: a builder with ``--backend docker`` needs the engine, a check
runner with ``--backend local`` needs the compilers (see :func:`checks_for`).

Each check gives a :class:`Finding`: ``ok``, ``missing`` (with the fix) or ``unchecked`` (it could not be checked
here, and says why: an engine reached over TLS or ssh, an image name the bare package cannot resolve…), never a
pass it did not see. The command exits 1 when something is missing, 0 otherwise, 2 for bad usage.

The actions run it before they install anything (``PYTHONPATH=<action>/src python3 -m cecai_converter.doctor``),
so this module imports only the standard library and stdlib-only modules of the package at import time; the
engine is spoken to over its HTTP API directly (the same ``DOCKER_HOST`` the docker backend uses), not through the
docker SDK, which is not installed yet at that point.

Disk rule (:func:`disk_needed`): a builder needs ``4 × model size + 3 GB`` free where it works (the source
download, the base GGUF, the quantized files and the one being staged beside its final name; 3 GB for the venv,
the llama-cpp-python build and llama.cpp's tools); a check runner ``2 × model size + 1 GB`` (the builder's files as
downloaded, their unpacked copy; the venv). The engine's image storage is its own and is not counted.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote

from .errors import EXIT_FAILED, EXIT_OK, ConverterError, UsageError, boundary
from .pairs import PAIRS, PairInfo, parse_pair

if TYPE_CHECKING:
    from .output import Output

__all__ = [
    "BUILDER_DISK",
    "CHECK_DISK",
    "MIN_CMAKE",
    "MIN_PYTHON",
    "ROLES",
    "RUNNERS_BEGIN",
    "RUNNERS_END",
    "Finding",
    "Report",
    "add_arguments",
    "checks_for",
    "diagnose",
    "disk_needed",
    "github_lines",
    "human_table",
    "main",
    "parse_size",
    "register",
    "runners_table",
]

ROLES: Final = ("builder", "check")
#: The oldest Python the package supports (pyproject's requires-python; a test keeps them equal).
MIN_PYTHON: Final = (3, 10)
#: llama.cpp's cmake_minimum_required.
MIN_CMAKE: Final = (3, 14)
#: Free disk: (times the model size, fixed bytes), by role. See the module docstring for what each part holds.
BUILDER_DISK: Final = (4, 3 * 10**9)
CHECK_DISK: Final = (2, 1 * 10**9)
#: How long one probe (a compiler, nvidia-smi, an engine request) may take before it counts as not answering.
PROBE_TIMEOUT_S: Final = 60.0
#: The engine's default socket when DOCKER_HOST is unset (the docker SDK's default too).
DEFAULT_ENGINE: Final = "unix:///var/run/docker.sock"
#: Where the NVIDIA Container Toolkit writes its CDI specification (podman and Docker's CDI mode read these).
_CDI_SPECS: Final = (
    "/etc/cdi/nvidia.yaml",
    "/etc/cdi/nvidia.json",
    "/var/run/cdi/nvidia.yaml",
    "/var/run/cdi/nvidia.json",
)
#: L4T's release file: present on every Jetson flashed with JetPack.
_TEGRA_RELEASE: Final = Path("/etc/nv_tegra_release")
_TOOLKIT_URL: Final = "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"
_ENGINE_FIX: Final = (
    "start a container engine, or point DOCKER_HOST at one: Docker: `sudo systemctl start docker`; podman: "
    "`podman system service --time=0 unix:///tmp/podman.sock &` then `export DOCKER_HOST=unix:///tmp/podman.sock` "
    "(scripts/start-podman.sh does both); the runner's user must be allowed to use the socket"
)

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


@dataclass(frozen=True)
class Report:
    """Every finding for one runner, role and pair."""

    role: str
    backend: str
    pair: PairInfo | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def missing(self) -> list[Finding]:
        """The findings that fail the runner."""
        return [f for f in self.findings if f.status == "missing"]

    @property
    def passed(self) -> bool:
        """Nothing is missing (an unchecked piece does not fail the runner; it is reported)."""
        return not self.missing

    def to_json(self) -> dict[str, Any]:
        """The report as ``--format json`` prints it."""
        return {
            "role": self.role,
            "backend": self.backend,
            "pair": self.pair.name if self.pair else None,
            "passed": self.passed,
            "findings": [asdict(f) for f in self.findings],
        }


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
    from .output import decimal_size

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


# -- the engine ------------------------------------------------------------------------------------------------------
class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the engine's unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _Engine:
    """The engine DOCKER_HOST names, spoken to over plain HTTP (the Docker Engine API, which podman serves too)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.host = environ.get("DOCKER_HOST") or DEFAULT_ENGINE
        self.where = f"DOCKER_HOST={self.host}" if environ.get("DOCKER_HOST") else f"{DEFAULT_ENGINE} (the default)"
        #: Why this engine cannot be spoken to here (TLS, ssh), or None.
        self.unsupported: str | None = None
        self._tcp: tuple[str, int] | None = None
        self._path: str | None = None
        if self.host.startswith(("unix://", "/")):
            self._path = self.host.removeprefix("unix://")
        elif self.host.startswith(("tcp://", "http://")) and not environ.get("DOCKER_TLS_VERIFY"):
            hostport = self.host.split("://", 1)[1].rstrip("/")
            name, _, port = hostport.rpartition(":")
            self._tcp = (name or hostport, int(port) if port.isdigit() else 2375)
        else:
            self.unsupported = (
                f"doctor speaks plain HTTP to unix:// and tcp:// engines; {self.where} needs TLS or ssh "
                "(the docker backend reaches it through the docker SDK)"
            )

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path``; (HTTP status, body). Raises OSError when nothing answers."""
        conn: http.client.HTTPConnection
        if self._path is not None:
            conn = _UnixConnection(self._path, PROBE_TIMEOUT_S)
        elif self._tcp is not None:
            conn = http.client.HTTPConnection(self._tcp[0], self._tcp[1], timeout=PROBE_TIMEOUT_S)
        else:
            raise OSError(self.unsupported)
        try:
            conn.request("GET", path, headers={"Host": "docker"})
            response = conn.getresponse()
            return response.status, response.read(8 << 20)
        except http.client.HTTPException as exc:
            raise OSError(f"not an engine's HTTP answer ({type(exc).__name__})") from None
        finally:
            conn.close()

    def get_json(self, path: str) -> tuple[int, Any]:
        """GET ``path`` and parse the body as JSON (None when it is not JSON)."""
        from .untrusted_json import loads_bounded

        status, body = self.get(path)
        try:
            return status, loads_bounded(body, what=f"the engine's answer to {path}")
        except ConverterError:
            return status, None


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"]).strip().splitlines()[0][:300] if body["message"].strip() else ""
    return ""


def check_engine(engine: _Engine) -> tuple[Finding, dict[str, Any] | None]:
    """The engine answers ``/_ping``; also its ``/info`` (for the runtimes), when it gives one."""
    if engine.unsupported:
        return Finding("container engine", "unchecked", engine.unsupported), None
    try:
        status, body = engine.get("/_ping")
    except OSError as exc:
        reason = "no such socket" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
        return Finding(
            "container engine", "missing", f"no container engine answers at {engine.where}: {reason}", _ENGINE_FIX
        ), None
    if status != 200 or body.strip() != b"OK":
        return Finding(
            "container engine",
            "missing",
            f"{engine.where} answered /_ping with HTTP {status}, not an engine's OK",
            _ENGINE_FIX,
        ), None
    try:
        _, info = engine.get_json("/info")
        _, version = engine.get_json("/version")
    except OSError:
        info, version = None, None
    name = "engine"
    if isinstance(version, dict):
        components = version.get("Components") or []
        names = [c.get("Name") for c in components if isinstance(c, dict)]
        name = f"{names[0] if names and isinstance(names[0], str) else 'engine'} {version.get('Version', '?')}"
    return Finding("container engine", "ok", f"{name} at {engine.where}"), info if isinstance(info, dict) else None


def _default_image(pair: PairInfo, environ: Mapping[str, str]) -> str | None:
    """The pair's default image, as the docker backend names it; None before the package's dependencies are
    installed (the backend's module needs PyYAML), when doctor runs from the action's source."""
    try:
        from .backends.docker import default_image
    except ImportError:
        return None
    return default_image(pair, environ)


def _pull_fix(image: str, pair: PairInfo) -> str:
    try:
        from .backends.docker import build_command_hint
    except ImportError:
        return f"`docker pull {image}` (log in first if it is private), or build it: `docker buildx bake {pair.slug}`"
    return build_command_hint(image, pair).replace("\n", "; ")


def check_image(engine: _Engine, engine_ok: bool, pair: PairInfo, image: str | None) -> Finding:
    """The pair's image is in the engine, or its registry gives it (``/distribution/NAME/json``, no pull)."""
    if image is None:
        return Finding(
            "image",
            "unchecked",
            f"the {pair.name} image's default name comes from the installed package (not importable here: "
            "cecai-converter's dependencies are not installed yet); give --image to check it",
        )
    if not engine_ok:
        return Finding("image", "unchecked", f"{image}: needs the container engine, which did not answer")
    try:
        status, body = engine.get_json(f"/images/{quote(image, safe='')}/json")
        if status == 200:
            labels = ((body or {}).get("Config") or {}).get("Labels") or {} if isinstance(body, dict) else {}
            other = labels.get("io.cecai.pair") if isinstance(labels, dict) else None
            if other and other != pair.name:
                return Finding(
                    "image",
                    "missing",
                    f"{image} is present but was built for {other}, not {pair.name}",
                    f"give the {pair.name} image (the action's `image` input, --image), or drop it for the default",
                )
            return Finding("image", "ok", f"{image} is present in the engine")
        status, body = engine.get_json(f"/distribution/{quote(image, safe='')}/json")
    except OSError as exc:
        return Finding("image", "unchecked", f"{image}: the engine stopped answering ({exc})")
    if status == 200:
        return Finding("image", "ok", f"{image} is not present; its registry has it (the job pulls it)")
    why = _message(body) or f"HTTP {status}"
    return Finding(
        "image",
        "missing",
        f"{image} is not in the engine and its registry does not give it ({why}); a private image needs "
        "`docker login` on the runner",
        _pull_fix(image, pair),
    )


def check_nvidia_runtime(
    pair: PairInfo, engine_ok: bool, info: dict[str, Any] | None, environ: Mapping[str, str]
) -> Finding:
    """The NVIDIA container runtime: ``--gpus all`` (CUDA: a runtime named nvidia, Docker's
    nvidia-container-runtime-hook, or a CDI specification) or ``--runtime nvidia`` (Jetson: the engine lists it)."""
    runtimes = sorted((info or {}).get("Runtimes") or {}) if isinstance((info or {}).get("Runtimes"), dict) else []
    if pair.docker_runtime:
        fix = (
            "JetPack: `sudo apt-get install nvidia-container-toolkit`, then `sudo nvidia-ctk runtime configure "
            "--runtime=docker && sudo systemctl restart docker`"
        )
        if not engine_ok or info is None:
            return Finding("NVIDIA runtime", "unchecked", "needs the container engine's /info, which did not answer")
        if pair.docker_runtime in runtimes:
            return Finding("NVIDIA runtime", "ok", f"the engine has the {pair.docker_runtime!r} runtime")
        return Finding(
            "NVIDIA runtime",
            "missing",
            f"{pair.name} containers run with --runtime {pair.docker_runtime}, which the engine does not have "
            f"(it has: {', '.join(runtimes) or 'none listed'})",
            fix,
        )
    signs = []
    if "nvidia" in runtimes:
        signs.append("the engine's 'nvidia' runtime")
    hook = shutil.which("nvidia-container-runtime-hook", path=environ.get("PATH"))
    if hook:
        signs.append(hook)
    signs += [spec for spec in _CDI_SPECS if Path(spec).is_file()]
    if signs:
        return Finding("NVIDIA runtime", "ok", f"--gpus all: {', '.join(signs)}")
    if not engine_ok:
        return Finding(
            "NVIDIA runtime",
            "unchecked",
            "no NVIDIA Container Toolkit hook or CDI specification on this host, and the engine (which may have "
            "the runtime) did not answer",
        )
    return Finding(
        "NVIDIA runtime",
        "missing",
        f"{pair.name} containers ask for --gpus all: the engine has no 'nvidia' runtime, "
        f"nvidia-container-runtime-hook is not on PATH and there is no CDI specification ({_CDI_SPECS[0]})",
        f"install the NVIDIA Container Toolkit ({_TOOLKIT_URL}), then Docker: `sudo nvidia-ctk runtime configure "
        f"--runtime=docker && sudo systemctl restart docker`; podman: `sudo nvidia-ctk cdi generate "
        f"--output={_CDI_SPECS[0]}`",
    )


# -- the whole diagnosis ---------------------------------------------------------------------------------------------
def default_backend(role: str) -> str:
    """A builder converts on the runner; a check runner runs the pair's image (the release workflow's defaults)."""
    return "local" if role == "builder" else "docker"


def checks_for(role: str, backend: str, pair: PairInfo | None) -> list[str]:
    """The names of the checks a runner of ``role`` running ``backend`` for ``pair`` gets, in order."""
    names = ["python", "python venv"]
    if backend == "local":
        names += ["C/C++ compiler", "cmake"]
        if pair is not None and pair.gpu:
            names += ["CUDA compiler", "GPU"]
    else:
        names += ["container engine", "image"]
        if pair is not None and pair.gpu:
            names += ["GPU", "NVIDIA runtime"]
    return [*names, "disk"]


def diagnose(
    role: str,
    pair: PairInfo | None,
    *,
    backend: str | None = None,
    model_bytes: int | None = None,
    path: Path | None = None,
    image: str | None = None,
    skip: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Report:
    """Check this machine for a runner of ``role`` (``builder`` or ``check``) and ``pair``.

    Args:
        role: ``builder`` or ``check``.
        pair: the hardware pair (required for a check runner; a builder without one converts for the runner's own
            CPU runtime, or in CPU_LLM_LLAMA's image with backend docker, as ``convert`` does).
        backend: ``local`` or ``docker`` (default: :func:`default_backend`).
        model_bytes: the model's weights size, for the disk check (None: the fixed part only).
        path: where the runner works (default: the current directory).
        image: the image a docker backend runs (default: the pair's default tag).
        skip: check names not to run (listed as skipped).
        environ: the environment (PATH, CC/CXX, DOCKER_HOST, CECAI_IMAGE_*; default os.environ).

    Raises:
        UsageError: an unknown role or backend, a check runner without a pair, an unknown check to skip.
    """
    env = os.environ if environ is None else environ
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}", hint=f"--role takes {' or '.join(ROLES)}")
    backend = backend or default_backend(role)
    if backend not in ("local", "docker"):
        raise UsageError(f"unknown backend {backend!r}", hint="--backend takes local or docker")
    if pair is None and role == "check":
        raise UsageError(
            "a check runner needs --pair (its image and GPU needs depend on it)",
            hint=f"give --pair: {', '.join(PAIRS)}",
        )
    if pair is None and backend == "docker":
        pair = PAIRS["CPU_LLM_LLAMA"]  # what `convert --backend docker` runs without --pair
    names = checks_for(role, backend, pair)
    every = {"python", "python venv", "C/C++ compiler", "cmake", "CUDA compiler", "GPU", "container engine", "image",
             "NVIDIA runtime", "disk"}  # fmt: skip
    unknown = [s for s in skip if s not in every]
    if unknown:
        raise UsageError(f"--skip {unknown[0]!r} is not a check", hint=f"checks: {', '.join(sorted(every))}")
    report = Report(role, backend, pair)
    engine = _Engine(env) if backend == "docker" else None
    engine_ok = False
    info: dict[str, Any] | None = None
    for name in names:
        if name in skip:
            report.findings.append(Finding(name, "skipped", "not checked: --skip"))
            continue
        finding: Finding
        if name == "python":
            finding = check_python()
        elif name == "python venv":
            finding = check_venv()
        elif name == "C/C++ compiler":
            finding = check_compilers(env)
        elif name == "cmake":
            finding = check_cmake(env)
        elif name == "CUDA compiler" and pair is not None:
            finding = check_nvcc(pair)
        elif name == "GPU" and pair is not None:
            finding = check_gpu(pair, env)
        elif name == "container engine" and engine is not None:
            finding, info = check_engine(engine)
            engine_ok = finding.status == "ok"
        elif name == "image" and engine is not None and pair is not None:
            finding = check_image(engine, engine_ok, pair, image or _default_image(pair, env))
        elif name == "NVIDIA runtime" and pair is not None:
            finding = check_nvidia_runtime(pair, engine_ok, info, env)
        else:  # "disk"
            finding = check_disk(role, model_bytes, path or Path.cwd())
        report.findings.append(finding)
    return report


# -- output ----------------------------------------------------------------------------------------------------------
_MARK: Final = {"ok": "ok", "missing": "MISSING", "unchecked": "unchecked", "skipped": "skipped"}


def human_table(report: Report) -> str:
    """The findings as a table, then one fix per missing piece, then the verdict."""
    who = f"{report.role} runner, backend {report.backend}, pair {report.pair.name if report.pair else '(none)'}"
    rows = [(f.check, _MARK[f.status], f.detail) for f in report.findings]
    w1 = max(len("CHECK"), *(len(r[0]) for r in rows))
    w2 = max(len("STATUS"), *(len(r[1]) for r in rows))
    lines = [f"doctor: {who}", f"{'CHECK'.ljust(w1)}  {'STATUS'.ljust(w2)}  DETAIL"]
    lines += [f"{a.ljust(w1)}  {b.ljust(w2)}  {c}" for a, b, c in rows]
    if report.missing:
        lines.append("")
        lines += [f"fix {f.check}: {f.fix}" for f in report.missing]
        lines.append(f"\n{len(report.missing)} missing: this runner cannot do this job yet")
    else:
        unchecked = [f.check for f in report.findings if f.status == "unchecked"]
        lines.append("\nready" + (f" (not checked here: {', '.join(unchecked)}; see above)" if unchecked else ""))
    return "\n".join(lines)


def _escape_data(value: str) -> str:
    # The runner's escaping (gha.escape_data): gha.py imports the package's dependencies, this module must not.
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(value: str) -> str:
    return _escape_data(value).replace(":", "%3A").replace(",", "%2C")


def github_lines(report: Report) -> str:
    """GitHub workflow commands: ``::error`` per missing piece (with its fix), ``::warning`` per unchecked one, and
    a plain line per piece that is there or skipped."""
    lines = []
    for f in report.findings:
        title = _escape_property(f"cecai-converter doctor: {f.check}")
        if f.status == "missing":
            lines.append(f"::error title={title}::{_escape_data(f'{f.detail}. Fix: {f.fix}')}")
        elif f.status == "unchecked":
            lines.append(f"::warning title={title}::{_escape_data(f'not checked: {f.detail}')}")
        else:
            lines.append(_escape_data(f"{f.status}  {f.check}: {f.detail}"))
    return "\n".join(lines)


# -- docs/runners.md ------------------------------------------------------------------------------------------------
#: The markers around the generated table in docs/runners.md (tests/test_doctor.py holds the doc to it).
RUNNERS_BEGIN: Final = "<!-- BEGIN runners table: generated by cecai_converter.doctor.runners_table() -->"
RUNNERS_END: Final = "<!-- END runners table -->"


def runners_table() -> str:
    """docs/runners.md's table: each job's runner labels and what ``doctor`` checks there, from :data:`PAIRS`."""

    def needs(role: str, backend: str, pair: PairInfo | None) -> str:
        return ", ".join(checks_for(role, backend, pair))

    def labels(pair: PairInfo) -> str:
        return ", ".join(f"`{label}`" for label in pair.runner_labels)

    cpu = PAIRS["CPU_LLM_LLAMA"]
    rows = [
        "| Job | Runner labels (`runs-on`) | Needs (backend docker) | Needs (backend local) | Check it with |",
        "|---|---|---|---|---|",
        f"| make (builder) | `builder-labels`, default {labels(cpu)} | {needs('builder', 'docker', cpu)} | "
        f"{needs('builder', 'local', None)} | `cecai-convert doctor --role builder` |",
    ]
    rows += [
        f"| check {p.name} | {labels(p)} | {needs('check', 'docker', p)} | {needs('check', 'local', p)} | "
        f"`cecai-convert doctor --role check --pair {p.name}` |"
        for p in PAIRS.values()
    ]
    return "\n".join(rows) + "\n"


# -- the command -----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The doctor's options (shared by ``cecai-convert doctor`` and ``python -m cecai_converter.doctor``)."""
    p.add_argument("--role", choices=ROLES, default="builder", help="what the runner does (default: builder)")
    p.add_argument(
        "--pair", metavar="PAIR",
        help=f"the hardware pair ({', '.join(PAIRS)}, or their slugs); required for --role check",
    )  # fmt: skip
    p.add_argument(
        "--backend", choices=("local", "docker"),
        help="how the runner converts or checks (default: local for a builder, docker for a check runner)",
    )  # fmt: skip
    p.add_argument(
        "--model-size", metavar="SIZE",
        help="the model's weights size (16GB, 1.5GiB, 800MB) for the disk check: a builder needs 4x it + 3 GB, a "
        "check runner 2x it + 1 GB; without it only the fixed part is checked",
    )  # fmt: skip
    p.add_argument("--path", type=Path, help="where the runner works, for the disk check (default: here)")
    p.add_argument("--image", help="the image a docker backend runs (default: the pair's default tag)")
    p.add_argument(
        "--skip", action="append", default=[], metavar="CHECK",
        help="a check not to run, repeatable (e.g. --skip 'python venv' where nothing is installed)",
    )  # fmt: skip
    p.add_argument(
        "--github", action="store_true",
        help="print GitHub workflow commands: ::error per missing piece, ::warning per unchecked one",
    )  # fmt: skip


def _report_from(args: argparse.Namespace) -> Report:
    pair = parse_pair(args.pair) if args.pair else None
    size = parse_size(args.model_size) if args.model_size else None
    return diagnose(
        args.role, pair, backend=args.backend, model_bytes=size, path=args.path, image=args.image, skip=args.skip
    )


def _emit(report: Report, args: argparse.Namespace, write: Callable[[str, Any], None]) -> int:
    text = github_lines(report) if args.github else human_table(report)
    write(text, report.to_json())
    return EXIT_OK if report.passed else EXIT_FAILED


def _cmd_doctor(args: argparse.Namespace, out: Output) -> int:
    def write(text: str, data: Any) -> None:
        if args.github:  # workflow commands, whatever --format says: the runner reads them from stdout
            print(text, file=out.stdout, flush=True)
        else:
            out.result(text, data)

    return _emit(_report_from(args), args, write)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``doctor`` to the CLI."""
    p = sub.add_parser(
        "doctor",
        help="check this runner for what its role and pair need (compilers, cmake, engine, image, GPU, disk)",
        description="Check this machine for a builder (Python with venv, C/C++ compiler, cmake, disk) or a check "
        "runner (container engine, the pair's image, GPU and NVIDIA runtime for the GPU and Jetson pairs, disk). "
        "Prints a table with a fix per missing piece. Exit 0: ready; 1: something is missing; 2: bad usage. "
        "docs/runners.md lists each pair's runner labels and needs.",
    )
    add_arguments(p)
    p.set_defaults(handler=_cmd_doctor)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cecai_converter.doctor``: the same command, runnable before the package's dependencies are
    installed (the actions run it from their source with the runner's Python)."""
    parser = argparse.ArgumentParser(
        prog="python -m cecai_converter.doctor",
        description="cecai-convert doctor, runnable before cecai-converter's dependencies are installed.",
    )
    add_arguments(parser)
    parser.add_argument("--format", choices=("human", "json"), default="human", help="result format on stdout")
    args = parser.parse_args(argv)

    def write(text: str, data: Any) -> None:
        if args.format == "json" and not args.github:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            print(text, flush=True)

    def report(exc: ConverterError) -> None:
        if args.github:
            print(f"::error title={_escape_property('cecai-converter doctor: ' + exc.title)}::"
                  f"{_escape_data(exc.message + (f'. {exc.hint}' if exc.hint else ''))}")  # fmt: skip
        else:
            print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)

    return boundary(lambda: _emit(_report_from(args), args, write), report=report, interrupted=lambda: None)


if __name__ == "__main__":
    sys.exit(main())
