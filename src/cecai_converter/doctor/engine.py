"""doctor's probes of the container engine, spoken to over its HTTP API (the Docker Engine API, which podman serves
too) at the same ``DOCKER_HOST`` the docker backend uses, not through the docker SDK, which is not installed yet when
the actions run doctor: the engine answers (:func:`check_engine`), the pair's image is there or in its registry
(:func:`check_image`), the NVIDIA container runtime (:func:`check_nvidia_runtime`)."""

from __future__ import annotations

import http.client
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from ..errors import ConverterError
from ..pairs import PairInfo
from ..untrusted_json import loads_bounded
from .probes import PROBE_TIMEOUT_S, Finding

#: The engine's default socket when DOCKER_HOST is unset (the docker SDK's default too).
DEFAULT_ENGINE: Final = "unix:///var/run/docker.sock"
#: Where the NVIDIA Container Toolkit writes its CDI specification (podman and Docker's CDI mode read these).
_CDI_SPECS: Final = (
    "/etc/cdi/nvidia.yaml",
    "/etc/cdi/nvidia.json",
    "/var/run/cdi/nvidia.yaml",
    "/var/run/cdi/nvidia.json",
)
_TOOLKIT_URL: Final = "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"
_ENGINE_FIX: Final = (
    "start a container engine, or point DOCKER_HOST at one: Docker: `sudo systemctl start docker`; podman: "
    "`podman system service --time=0 unix:///tmp/podman.sock &` then `export DOCKER_HOST=unix:///tmp/podman.sock` "
    "(scripts/start-podman.sh does both); the runner's user must be allowed to use the socket"
)


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


class Engine:
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
        status, body = self.get(path)
        try:
            return status, loads_bounded(body, what=f"the engine's answer to {path}")
        except ConverterError:
            return status, None


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"]).strip().splitlines()[0][:300] if body["message"].strip() else ""
    return ""


def check_engine(engine: Engine) -> tuple[Finding, dict[str, Any] | None]:
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


def pair_default_image(pair: PairInfo, environ: Mapping[str, str]) -> str | None:
    """The pair's default image, as the docker backend names it; None before the package's dependencies are
    installed (the backend's module needs PyYAML), when doctor runs from the action's source."""
    try:  # lazy: the backends need PyYAML (optional), not installed when the actions run doctor
        from ..backends.container_spec import default_image
    except ImportError:
        return None
    return default_image(pair, environ)


def _pull_fix(image: str, pair: PairInfo) -> str:
    try:  # lazy: the backends need PyYAML and the docker SDK (optional), not installed yet there
        from ..backends.docker import build_command_hint
    except ImportError:
        return f"`docker pull {image}` (log in first if it is private), or build it: `docker buildx bake {pair.slug}`"
    return build_command_hint(image, pair).replace("\n", "; ")


def check_image(engine: Engine, engine_ok: bool, pair: PairInfo, image: str | None) -> Finding:
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
