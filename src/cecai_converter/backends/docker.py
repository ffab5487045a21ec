"""The docker backend: run ``cecai-convert`` inside the pair's image, through the Docker Engine API.

What each container is (image, command, mounts, user, network, GPUs, runtime) is decided by the pure functions of
:mod:`cecai_converter.backends.container_spec`; this module only carries a :class:`ContainerSpec` out with the
``docker`` SDK, which talks to Docker or to podman's Docker-compatible API alike
(``DOCKER_HOST=unix:///run/user/1000/podman/podman.sock``): :func:`run_jobs` (``run``), :func:`run_convert` and
:func:`run_check`.

Before a container starts, its image is looked up in the engine and the folders it reads are checked readable by
its user. Its output is streamed (stdout to stdout, stderr to stderr), its exit status reaches the caller, and it is
removed afterwards, on Ctrl-C too (it is first asked to stop, so the pipeline inside removes its staging folders).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import socket
import stat
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ..config import PairJob
from ..errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    ContainerFailed,
    EngineUnreachable,
    ImageNotFound,
    ToolNotFound,
    UsageError,
)
from ..fsutil import STAGING_PREFIX
from ..pairs import PairInfo
from ..request import Request
from .container_spec import DEFAULT_IMAGE_REPO, IMAGE_REPO_ENV, ContainerSpec, container_spec

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

    from ..output import Output

__all__ = [
    "ContainerFailed",
    "EngineUnreachable",
    "ImageNotFound",
    "build_command_hint",
    "check_readable",
    "connect",
    "run_check",
    "run_container",
    "run_convert",
    "run_jobs",
    "unreadable_paths",
]

#: How long a container gets to clean up after SIGTERM before it is killed.
STOP_TIMEOUT_S: Final = 20

_ENGINE_UNREACHABLE_HINT: Final = (
    "start a container engine, or point DOCKER_HOST at one:\n"
    "  Docker:  sudo systemctl start docker   (or start Docker Desktop)\n"
    "  podman:  podman system service --time=0 unix:///tmp/podman.sock &  then\n"
    "           export DOCKER_HOST=unix:///tmp/podman.sock   (scripts/start-podman.sh does both)\n"
    "or convert without containers: --backend local"
)


# -- running one container of a command ------------------------------------------------------------------------------
def _run_one(spec: ContainerSpec, out: Output, what: str) -> int:
    """Check the image and the readable folders, run the container, return its status (Ctrl-C re-raised)."""
    client = connect()
    try:
        _check_image(client, spec)
        check_readable(spec)
        out.info(f"==> {spec.pair.name}: {what} in {spec.image} (container, network {spec.network_mode or 'default'})")
        status = run_container(client, spec, out)
    finally:
        client.close()
    if status == EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    return status


def run_convert(spec: ContainerSpec, out: Output) -> None:
    """Run one ``convert`` container, its output streamed to ``out`` (the caller prints the result).

    Raises:
        EngineUnreachable, ImageNotFound, ContainerFailed; KeyboardInterrupt after the container is removed.
    """
    status = _run_one(spec, out, "converting")
    if status != 0:
        raise ContainerFailed(
            f"the conversion failed inside the {spec.pair.name} container (exit {status}); "
            "nothing partial was published",
            return_code=status,
            hint="its output is above",
        )


def run_check(spec: ContainerSpec, out: Output) -> None:
    """Run one ``check`` container. A check that fails inside (exit 1) still leaves its record: the caller reads it.

    Raises:
        EngineUnreachable, ImageNotFound, ContainerFailed (the container could not run the check at all).
    """
    status = _run_one(spec, out, "checking")
    if status not in (0, EXIT_FAILED):
        raise ContainerFailed(
            f"the check could not run inside the {spec.pair.name} container (exit {status})",
            return_code=status,
            hint="its output is above",
        )


# -- the engine ------------------------------------------------------------------------------------------------------
def build_command_hint(image: str, pair: PairInfo) -> str:
    """How to get a missing image: pull it when it is a published tag, else build it."""
    repo = os.environ.get(IMAGE_REPO_ENV) or DEFAULT_IMAGE_REPO
    build = (
        f"docker buildx bake {pair.slug}   (from a checkout; without buildx: scripts/build-image.sh {pair.slug} "
        f"{image})"
    )
    if image.startswith(repo + ":") and not image.startswith("localhost/"):
        return f"pull it:  docker pull {image}\nor build it:  {build}"
    return f"build it:  {build}\nor pull it if it is published:  docker pull {image}"


def connect(environ: Mapping[str, str] | None = None) -> docker.DockerClient:
    """A client for the engine ``DOCKER_HOST`` names (or the default socket), checked with a ping.

    Raises:
        ToolNotFound: the docker SDK is not installed.
        EngineUnreachable: nothing answers there.
    """
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise ToolNotFound(
            "the docker backend needs the docker Python SDK",
            hint="pip install 'cecai-converter[docker]'   (or use --backend local)",
        ) from None
    env = dict(os.environ if environ is None else environ)
    where = env.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    _check_unix_socket(env.get("DOCKER_HOST") or "unix:///var/run/docker.sock", where)
    client: docker.DockerClient | None = None
    try:
        client = docker.from_env(environment=env)
        client.ping()
    except (DockerException, OSError) as exc:  # some transports raise socket errors unwrapped
        if client is not None:
            client.close()
        raise EngineUnreachable(
            f"no container engine answers at {where}: {_first_line(exc)}", hint=_ENGINE_UNREACHABLE_HINT
        ) from None
    return client


def _check_unix_socket(host: str, where: str) -> None:
    """Fail fast, and without leaking a socket (the SDK's unix transport does), when nothing listens there."""
    if not host.startswith(("unix://", "/")):
        return
    path = host.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
    except OSError as exc:
        reason = "no such socket" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
        raise EngineUnreachable(
            f"no container engine answers at {where}: {reason}", hint=_ENGINE_UNREACHABLE_HINT
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _check_image(client: docker.DockerClient, spec: ContainerSpec) -> None:
    from docker.errors import APIError
    from docker.errors import ImageNotFound as SdkImageNotFound

    try:
        image = client.images.get(spec.image)
    except SdkImageNotFound:
        raise ImageNotFound(
            f"image {spec.image} (for {spec.pair.name}) is not in the container engine",
            hint=build_command_hint(spec.image, spec.pair),
        ) from None
    except APIError as exc:
        raise EngineUnreachable(f"the engine failed to look up {spec.image}: {_first_line(exc)}") from None
    labels = (image.attrs.get("Config") or {}).get("Labels") or {}
    other = labels.get("io.cecai.pair")
    if other and other != spec.pair.name:
        raise UsageError(
            f"image {spec.image} was built for {other}, not {spec.pair.name}",
            hint=f"give the {spec.pair.name} image with --image or IMAGE_NAME, or drop --image for the default tag",
        )


def unreadable_paths(spec: ContainerSpec, limit: int = 5) -> list[Path]:
    """Files and folders under ``spec.read_dirs`` that the container's user could not read (at most ``limit``)."""
    uid, gid = spec.uid_gid
    bad: list[Path] = []
    for root in spec.read_dirs:
        if not root.exists():
            continue
        for path in (root, *root.rglob("*")):
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
            if st.st_uid == uid:
                need <<= 6
            elif st.st_gid == gid:
                need <<= 3
            if st.st_mode & need != need:
                bad.append(path)
                if len(bad) >= limit:
                    return bad
    return bad


def check_readable(spec: ContainerSpec) -> None:
    """Raise a clear error, before any container starts, when its user could not read the model or configuration.

    Raises:
        UsageError: names the unreadable paths and the ``chmod`` that fixes them.
    """
    bad = unreadable_paths(spec)
    if not bad:
        return
    listing = ", ".join(str(p) for p in bad)
    why = (
        f" (as root, you get containers that run as the image's unprivileged user {spec.user}, never as root)"
        if spec.chown_dirs
        else ""
    )
    raise UsageError(
        f"the {spec.pair.name} container, running as {spec.user}, could not read: {listing}{why}",
        hint="make the model and configuration folders readable: chmod -R a+rX "
        + " ".join(str(d) for d in spec.read_dirs),
    )


def _staging_entries(folders: Iterable[Path]) -> set[Path]:
    found: set[Path] = set()
    for folder in folders:
        if folder.is_dir():
            found.update(
                e
                for e in folder.iterdir()
                if e.name.startswith(STAGING_PREFIX) or (e.name.startswith(".") and e.name.endswith(".partial"))
            )
    return found


def _remove_leftovers(spec: ContainerSpec, before: set[Path]) -> None:
    """Remove staging folders the (now gone) container left behind: nothing partial stays in the outputs."""
    for entry in _staging_entries(spec.watch_dirs) - before:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _stream(client: docker.DockerClient, container: Container, out: Output) -> None:
    """Copy the container's stdout to ``out.stdout`` and its stderr to ``out.stderr`` as it runs."""
    decoders = {
        "out": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        "err": codecs.getincrementaldecoder("utf-8")(errors="replace"),
    }
    stream = client.api.attach(container.id, stdout=True, stderr=True, stream=True, logs=True, demux=True)
    try:
        for chunk_out, chunk_err in stream:
            if chunk_out:
                out.stdout.write(decoders["out"].decode(chunk_out))
                out.stdout.flush()
            if chunk_err:
                out.stderr.write(decoders["err"].decode(chunk_err))
                out.stderr.flush()
    finally:
        # Closing the HTTP response releases the hijacked socket (CancellableStream.close() leaves it open).
        response = getattr(stream, "_response", None)
        if response is not None:
            response.close()


def run_container(client: docker.DockerClient, spec: ContainerSpec, out: Output) -> int:
    """Create, start and stream one container; return its exit status. The container is always removed.

    On Ctrl-C (or SIGTERM, which the CLI turns into KeyboardInterrupt) the container is asked to stop, so the
    pipeline inside cleans up, then removed; the interrupt is re-raised.
    """
    from docker.errors import APIError, NotFound

    for folder in spec.make_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    uid, gid = spec.uid_gid
    for folder in spec.chown_dirs:
        for path in (folder, *folder.rglob("*")):
            os.chown(path, uid, gid, follow_symlinks=False)
    before = _staging_entries(spec.watch_dirs)
    container: Container | None = None
    try:
        try:
            container = client.containers.create(
                name=f"cecai-{spec.pair.slug}-{uuid.uuid4().hex[:10]}", **spec.create_kwargs()
            )
            container.start()
        except APIError as exc:
            raise ContainerFailed(
                f"the engine could not start the {spec.pair.name} container from {spec.image}: "
                f"{exc.explanation or _first_line(exc)}",
                return_code=EXIT_FAILED,
                hint=_start_hint(spec, exc),
            ) from None
        _stream(client, container, out)
        result = container.wait()
        return int(result.get("StatusCode", EXIT_FAILED))
    except KeyboardInterrupt:
        if container is not None:
            with contextlib.suppress(APIError, NotFound):
                container.stop(timeout=STOP_TIMEOUT_S)
        raise
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except NotFound:
                pass
            except APIError as exc:
                print(
                    f"warning: could not remove container {container.short_id}: {_first_line(exc)}",
                    file=sys.stderr,
                )
        _remove_leftovers(spec, before)


def _start_hint(spec: ContainerSpec, exc: BaseException) -> str:
    text = str(exc).lower()
    if spec.gpus and ("gpu" in text or "device driver" in text or "nvidia" in text):
        return "this pair needs an NVIDIA GPU and the NVIDIA Container Toolkit (nvidia-ctk) on the host"
    if spec.runtime and "runtime" in text:
        return f"this pair needs the {spec.runtime!r} runtime: install JetPack's nvidia-container-runtime"
    return "check the engine's log; `docker run` of the same image should fail the same way"


def run_jobs(jobs: list[PairJob], requests: Sequence[Request], *, image: str | None, out: Output) -> int:
    """Convert each job inside its pair's image, one after the other.

    Every image is checked before the first container starts. A failing pair does not stop the others; the
    first failure's exit status is raised at the end as :class:`ContainerFailed` (its exit code is the
    container's).

    Returns:
        0 when every container succeeded.

    Raises:
        EngineUnreachable, ImageNotFound, ContainerFailed; KeyboardInterrupt after the container is removed.
    """
    specs = [
        container_spec(job, request, image=image, fmt=out.fmt, verbose=out.verbose)
        for job, request in zip(jobs, requests, strict=True)
    ]
    client = connect()
    try:
        for spec in specs:
            _check_image(client, spec)
            check_readable(spec)
        failures: list[tuple[ContainerSpec, int]] = []
        for spec in specs:
            out.info(f"==> {spec.pair.name}: {spec.image} (container, network {spec.network_mode or 'default'})")
            status = run_container(client, spec, out)
            if status == EXIT_INTERRUPTED:
                raise KeyboardInterrupt
            if status != 0:
                failures.append((spec, status))
    finally:
        client.close()
    if failures:
        spec, status = failures[0]
        names = ", ".join(f"{s.pair.name} (exit {code})" for s, code in failures)
        logs = ", ".join(str(j.log_file) for j in jobs if any(j.pair == s.pair for s, _ in failures))
        raise ContainerFailed(
            f"the conversion failed inside the container for {names}; nothing partial was published",
            return_code=status,
            hint=f"its output is above; the log: {logs}",
        )
    return 0
