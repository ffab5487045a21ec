"""The docker backend's container specifications: what each container is, decided without a container engine.

Every decision lives here, in pure functions from their inputs to a :class:`ContainerSpec` (image, command, mounts,
user, network, GPUs, runtime): :func:`container_spec` for a Converter folder's pair (``run``), :func:`convert_spec`
for one model (``convert``) and :func:`check_spec` for a builder's files (``check``). They read the caller's paths
(a model folder present or not, a request's files) but never talk to an engine, so they are tested without one;
:mod:`cecai_converter.backends.docker` carries a specification out.

Inside the container the layout is fixed::

    /job/configurations   the Converter folder's configurations/      read-only
    /job/models           MODELS_PATH (the model folder's parent)     read-only
    /job/outputs          OUTPUTS_PATH                                writable
    /job/logs             LOGS_PATH                                   writable
    /job/inputs/<n>/      each file the request names (IMATRIX…)     read-only

The options travel resolved, as JSON in ``CECAI_REQUEST`` (:meth:`cecai_converter.request.Request.to_json`, read
by ``run --request env:CECAI_REQUEST``), with their sources: the container resolves nothing again.

The container runs as the caller's uid:gid (files it writes belong to the caller), with no network when the
model is already on disk, all GPUs on GPU_LLM_LLAMA and the ``nvidia`` runtime on AGX_ORIN_LLM_LLAMA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Final, Protocol

from .. import __version__, environment
from ..config import PairJob
from ..errors import ConfigError, UsageError
from ..option_table import OPTIONS
from ..pairs import PairInfo
from ..request import REQUEST_ENV, Request

__all__ = [
    "CONTAINER_INPUTS_DIR",
    "CONTAINER_JOB_DIR",
    "CONTAINER_LABEL",
    "DEFAULT_IMAGE_REPO",
    "DEFAULT_IMAGE_TEMPLATE",
    "IMAGE_GID",
    "IMAGE_REPO_ENV",
    "IMAGE_TEMPLATE_ENV",
    "IMAGE_UID",
    "CheckLimits",
    "ContainerSpec",
    "Mount",
    "check_spec",
    "container_spec",
    "convert_spec",
    "default_image",
    "resolve_image",
]

#: Where the Converter folder appears inside the container.
CONTAINER_JOB_DIR: Final = PurePosixPath("/job")
#: The repository of the published images; ``CECAI_IMAGE_REPO`` overrides it (a fork, a mirror, ``localhost/…``).
DEFAULT_IMAGE_REPO: Final = "ghcr.io/cecai/cecai-converter"
IMAGE_REPO_ENV: Final = environment.IMAGE_REPO
#: How a pair's default tag is formed; ``CECAI_IMAGE_TEMPLATE`` overrides it. Fields: repo, version, slug, pair.
DEFAULT_IMAGE_TEMPLATE: Final = "{repo}:{version}-{slug}"
IMAGE_TEMPLATE_ENV: Final = environment.IMAGE_TEMPLATE
#: Labels put on every container, so tests and users can find (and clean up) ours.
CONTAINER_LABEL: Final = "io.cecai.converter"
#: Caller variables handed to the container when set (values are read at run time, never stored or printed).
#: The token and endpoint only where the container has a network (a model still to download).
_PASS_ALWAYS: Final = (environment.DEBUG, environment.NO_PROGRESS)
_PASS_WITH_NETWORK: Final = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")
#: Where the request's files (IMATRIX, CALIBRATION_TEXT, EVAL_TEXT…) are mounted read-only, one folder each.
CONTAINER_INPUTS_DIR: Final = CONTAINER_JOB_DIR / "inputs"
#: The images' unprivileged user (``useradd --uid 10001`` in images/Dockerfile). A root caller's containers run as
#: this user rather than as root; the pair's output and log folders are handed to it first.
IMAGE_UID: Final = 10001
#: HOME inside the container: an arbitrary uid has no home in the image, so caches go to the container's own /tmp.
_CONTAINER_HOME: Final = "/tmp"  # noqa: S108 (a path inside the throwaway container, not on this machine)
IMAGE_GID: Final = 10001


class CheckLimits(Protocol):
    """What :func:`check_spec` reads of the check's limits (:class:`cecai_converter.check.Limits`).

    A protocol rather than that class: the backends sit below the ``check`` command, which imports them.
    """

    @property
    def max_kld(self) -> float:
        """The largest KL-divergence allowed against the builder's runtime."""
        ...

    @property
    def min_top1(self) -> float:
        """The smallest top-1 agreement allowed with the builder's runtime."""
        ...


@dataclass(frozen=True)
class Mount:
    """A bind mount: a folder or file of the caller's machine at ``target`` inside the container."""

    source: Path
    target: str
    read_only: bool

    def as_docker(self) -> dict[str, Any]:
        """The ``volumes`` entry the docker SDK takes for this mount."""
        return {"bind": self.target, "mode": "ro" if self.read_only else "rw"}


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one pair's container; built by :func:`container_spec`, run by
    :func:`cecai_converter.backends.docker.run_jobs`.

    Attributes:
        pair: the hardware pair this container converts for.
        image: the image reference.
        entrypoint: the program run (``cecai-convert``), explicit so IMAGE_NAME images with another entrypoint work.
        command: its arguments.
        mounts: bind mounts, in a stable order.
        user: ``uid:gid``.
        network_mode: ``"none"``, or ``None`` for the engine's default network.
        gpus: request every GPU (``--gpus all``).
        runtime: the OCI runtime (``nvidia`` on Jetson), or ``None`` for the engine's default.
        environment: fixed variables set in the container.
        passthrough_env: names of caller variables copied in at run time when they are set.
        labels: container labels.
        make_dirs: caller folders created before the start (writable mounts; an engine would create them as root).
        chown_dirs: folders given to ``user`` before the start (only when a root caller runs as the image user).
        read_dirs: folders ``user`` must be able to read (the model and the configuration), checked before the start.
        watch_dirs: folders whose new staging leftovers are removed after the container ends.
    """

    pair: PairInfo
    image: str
    entrypoint: tuple[str, ...]
    command: tuple[str, ...]
    mounts: tuple[Mount, ...]
    user: str
    network_mode: str | None
    gpus: bool
    runtime: str | None
    environment: Mapping[str, str] = field(default_factory=dict)
    passthrough_env: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    make_dirs: tuple[Path, ...] = ()
    chown_dirs: tuple[Path, ...] = ()
    read_dirs: tuple[Path, ...] = ()
    watch_dirs: tuple[Path, ...] = ()

    @property
    def uid_gid(self) -> tuple[int, int]:
        """``user`` as numbers."""
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)

    @property
    def device_requests(self) -> list[dict[str, Any]]:
        """The engine's ``DeviceRequests`` (``--gpus all`` is ``Count -1`` with the ``gpu`` capability)."""
        if not self.gpus:
            return []
        return [{"Driver": "", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]], "Options": {}}]

    def docker_run_args(self) -> list[str]:
        """The same container as a ``docker run`` command line (for the log and for users who want to rerun it)."""
        argv = ["docker", "run", "--rm", "--user", self.user]
        if self.network_mode:
            argv += ["--network", self.network_mode]
        if self.gpus:
            argv += ["--gpus", "all"]
        if self.runtime:
            argv += ["--runtime", self.runtime]
        for m in self.mounts:
            argv += ["-v", f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}"]
        for key, value in self.environment.items():
            argv += ["-e", f"{key}={value}"]
        argv += ["--entrypoint", self.entrypoint[0], self.image, *self.entrypoint[1:], *self.command]
        return argv

    def create_kwargs(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``client.containers.create``; ``environ`` supplies the pass-through values."""
        source = os.environ if environ is None else environ
        env = dict(self.environment)
        env.update({name: source[name] for name in self.passthrough_env if source.get(name)})
        kwargs: dict[str, Any] = {
            "image": self.image,
            "entrypoint": list(self.entrypoint),
            "command": list(self.command),
            "volumes": {str(m.source): m.as_docker() for m in self.mounts},
            "user": self.user,
            "environment": env,
            "labels": dict(self.labels),
            "detach": True,
            "stdin_open": False,
            "tty": False,
        }
        if self.network_mode:
            kwargs["network_mode"] = self.network_mode
        if self.gpus:
            from docker.types import DeviceRequest

            kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if self.runtime:
            kwargs["runtime"] = self.runtime
        return kwargs


def default_image(pair: PairInfo, environ: Mapping[str, str] | None = None) -> str:
    """The pair's default image: ``CECAI_IMAGE_TEMPLATE`` (default ``{repo}:{version}-{slug}``) filled in.

    Raises:
        ConfigError: the template names a field other than repo, version, slug and pair.
    """
    env = os.environ if environ is None else environ
    template = env.get(IMAGE_TEMPLATE_ENV) or DEFAULT_IMAGE_TEMPLATE
    repo = env.get(IMAGE_REPO_ENV) or DEFAULT_IMAGE_REPO
    try:
        return template.format(repo=repo, version=__version__, slug=pair.slug, pair=pair.name)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{IMAGE_TEMPLATE_ENV}={template!r} is not a valid image template ({exc})",
            hint="use the fields {repo}, {version}, {slug} and {pair}, e.g. '{repo}:{version}-{slug}'",
        ) from None


def resolve_image(job: PairJob, explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The image for a job: ``--image``, else IMAGE_NAME from the configuration, else the pair's default tag."""
    return explicit or job.image_name or default_image(job.pair, environ)


def _models_root(job: PairJob) -> Path:
    """MODELS_PATH: the model folder with MODEL_NAME's parts (``org/name`` has two) taken off."""
    root = job.model_dir
    for _ in PurePosixPath(job.model_name).parts:
        root = root.parent
    return root


#: Kernel and device trees: nothing in them is a model input.
_SYSTEM_ROOTS: Final = (Path("/proc"), Path("/sys"), Path("/dev"))


def _request_mounts(request: Request) -> tuple[Request, list[Mount]]:
    """The request as the container sees it: each file it names mounted read-only under /job/inputs/<n>/ and the
    value replaced by that path. The values are the caller's resolved paths (flag, variable or YAML alike).

    Raises:
        UsageError: a file the request names is missing (the message says where the value came from).
    """
    mounts: list[Mount] = []
    inside: dict[str, str] = {}
    for spec in OPTIONS:
        value = request[spec.name]
        if spec.kind not in ("path", "imatrix") or value is None or value == "auto" or not spec.to_container:
            continue
        host = Path(value)
        source = request.sources.get(spec.name, "default")
        named = {"cli": spec.flag, "env": spec.env, "yaml": spec.yaml_key or spec.flag}.get(source, spec.flag)
        if any(Path(host).resolve().is_relative_to(root) for root in _SYSTEM_ROOTS):
            # /proc/self/environ and its kin hold this process's tokens: never a model input, never in a container.
            raise UsageError(f"{named} {host}: a system file, not an input", hint="give a regular file")
        if not host.is_file():
            raise UsageError(f"{named} {host}: no such file", hint="the docker backend mounts each file read-only")
        target = str(CONTAINER_INPUTS_DIR / str(len(mounts)) / host.name)
        mounts.append(Mount(host, target, read_only=True))
        inside[spec.name] = target
    return request.replace(**inside), mounts


def _request_env(request: Request) -> dict[str, str]:
    """The container's variables that carry the request (``run``/``convert`` ``--request env:CECAI_REQUEST``)."""
    return {REQUEST_ENV: request.to_json()}


def container_spec(
    job: PairJob,
    request: Request,
    *,
    image: str | None = None,
    fmt: str = "human",
    verbose: bool = False,
    uid_gid: tuple[int, int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ContainerSpec:
    """The container that converts ``job``: a pure function of its arguments (and ``environ`` for the image).

    Args:
        job: one pair of a Converter folder (``config.load_converter_dir``).
        request: the pair's resolved options (:func:`cecai_converter.request.resolve`); the container gets it as
            JSON in ``CECAI_REQUEST``, its files mounted read-only under /job/inputs.
        image: ``--image``; overrides IMAGE_NAME and the default tag.
        fmt, verbose: the caller's ``--format`` and ``-v``, so the container prints the same way.
        uid_gid: the caller's uid and gid; default this process's. The container runs as the caller, except that
            a root caller's container runs as the image's unprivileged user (:data:`IMAGE_UID`), never as root.
        environ: the environment read for the image template; default ``os.environ``.

    Raises:
        ConfigError: the image template is malformed, or OUTPUTS_PATH/LOGS_PATH holds the model or configurations/.
        UsageError: a file the request names is missing.
    """
    pair = job.pair
    uid, gid, as_image_user = _container_user(uid_gid)
    inside, input_mounts = _request_mounts(request)
    job_dir = CONTAINER_JOB_DIR
    models_root = _models_root(job)
    outputs_root = job.outputs_dir.parent
    logs_root = job.logs_dir.parent
    for key, root in (("OUTPUTS_PATH", outputs_root), ("LOGS_PATH", logs_root)):
        # The container can write all of this folder: it must not hold the model or the configuration, which
        # the container sees read-only and the run must never change.
        for name, held in (("the model folder", models_root), ("configurations/", job.config_dir)):
            if held.resolve().is_relative_to(root.resolve()):
                raise ConfigError(
                    f"{key} {root} holds {name} ({held}): the docker backend mounts it writable",
                    hint=f"set {key} to a folder of its own (default ../{key.split('_')[0].lower()})",
                )
    mounts = (
        Mount(job.config_dir, str(job_dir / "configurations"), read_only=True),
        Mount(models_root, str(job_dir / "models"), read_only=True),
        Mount(outputs_root, str(job_dir / "outputs"), read_only=False),
        Mount(logs_root, str(job_dir / "logs"), read_only=False),
        *input_mounts,
    )
    model_is_local = job.model_dir.is_dir()
    command = (
        *(["-v"] if verbose else []),
        "--format",
        fmt,
        "run",
        str(job_dir),
        "--pair",
        pair.name,
        "--backend",
        "local",
        "--models-path",
        str(job_dir / "models"),
        "--outputs-path",
        str(job_dir / "outputs"),
        "--logs-path",
        str(job_dir / "logs"),
        "--request",
        f"env:{REQUEST_ENV}",
    )
    return ContainerSpec(
        pair=pair,
        image=resolve_image(job, image, environ),
        entrypoint=("cecai-convert",),
        command=command,
        mounts=mounts,
        user=f"{uid}:{gid}",
        network_mode="none" if model_is_local else None,
        # What the pair's containers need from the engine is a fact of the pair table (pairs.py).
        gpus=pair.docker_gpus,
        runtime=pair.docker_runtime,
        environment=MappingProxyType({"HOME": _CONTAINER_HOME, environment.IN_CONTAINER: "1", **_request_env(inside)}),
        passthrough_env=_PASS_ALWAYS + (() if model_is_local else _PASS_WITH_NETWORK),
        labels=MappingProxyType(
            {CONTAINER_LABEL: __version__, "io.cecai.pair": pair.name, "io.cecai.model": job.model_name}
        ),
        make_dirs=(outputs_root, logs_root, job.outputs_dir, job.logs_dir),
        chown_dirs=(job.outputs_dir, job.logs_dir) if as_image_user else (),
        read_dirs=(job.config_dir, job.model_dir),
        watch_dirs=(outputs_root, job.outputs_dir),
    )


def _container_user(uid_gid: tuple[int, int] | None) -> tuple[int, int, bool]:
    """The uid:gid a container runs as: the caller's, except that a root caller's runs as the image user."""
    uid, gid = uid_gid if uid_gid is not None else (os.getuid(), os.getgid())
    if uid == 0:
        return IMAGE_UID, IMAGE_GID, True
    return uid, gid, False


def convert_spec(
    model: str,
    outdir: Path,
    request: Request,
    *,
    pair: PairInfo,
    model_name: str,
    precisions: Sequence[str],
    revision: str | None = None,
    image: str | None = None,
    verbose: bool = False,
    uid_gid: tuple[int, int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ContainerSpec:
    """The container for ``cecai-convert convert`` (one model folder or Hub repo, no Converter layout).

    The model folder is mounted read-only at ``/job/model`` and ``outdir`` writable at ``/job/outputs``; a Hub repo
    id is downloaded inside the container, which then has the engine's default network (and ``HF_TOKEN``). The
    container prints in human form: the caller reads the manifest it leaves in ``outdir``.

    Args:
        model: a local model folder or a Hub repo id.
        outdir: the caller's output folder.
        pair: whose image runs and whose runtime verifies.
        model_name: the output files' stem (computed by the caller: the folder is renamed inside the container).
        request: the resolved options, sent as JSON (``CECAI_REQUEST``), its files mounted read-only.
        precisions, revision: what to make, and the Hub revision.
        image: the image; default the pair's default tag.
    """
    uid, gid, as_image_user = _container_user(uid_gid)
    inside, input_mounts = _request_mounts(request)
    local = Path(model).resolve() if Path(model).is_dir() else None
    mounts = [Mount(outdir, str(CONTAINER_JOB_DIR / "outputs"), read_only=False)]
    if local is not None:
        mounts.append(Mount(local, str(CONTAINER_JOB_DIR / "model"), read_only=True))
    command = (
        *(["-v"] if verbose else []),
        "convert",
        str(CONTAINER_JOB_DIR / "model") if local is not None else model,
        "--outdir",
        str(CONTAINER_JOB_DIR / "outputs"),
        "--model-name",
        model_name,
        "--pair",
        pair.name,
        *(a for p in precisions for a in ("--precision", p)),
        *(["--revision", revision] if revision else []),
        "--backend",
        "local",
        "--request",
        f"env:{REQUEST_ENV}",
    )
    return ContainerSpec(
        pair=pair,
        image=image or default_image(pair, environ),
        entrypoint=("cecai-convert",),
        command=command,
        mounts=(*mounts, *input_mounts),
        user=f"{uid}:{gid}",
        network_mode="none" if local is not None else None,
        gpus=pair.docker_gpus,
        runtime=pair.docker_runtime,
        environment=MappingProxyType({"HOME": _CONTAINER_HOME, environment.IN_CONTAINER: "1", **_request_env(inside)}),
        passthrough_env=_PASS_ALWAYS + (() if local is not None else _PASS_WITH_NETWORK),
        labels=MappingProxyType(
            {CONTAINER_LABEL: __version__, "io.cecai.pair": pair.name, "io.cecai.model": model_name}
        ),
        make_dirs=(outdir,),
        chown_dirs=(outdir,) if as_image_user else (),
        read_dirs=(local,) if local is not None else (),
        watch_dirs=(outdir,),
    )


def check_spec(
    folder: Path,
    record: Path,
    *,
    pair: PairInfo,
    image: str | None = None,
    limits: CheckLimits | None = None,
    n_gpu_layers: int | None = None,
    threads: int | None = None,
    verbose: bool = False,
    uid_gid: tuple[int, int] | None = None,
    environ: Mapping[str, str] | None = None,
    fidelity: str = "auto",
) -> ContainerSpec:
    """The container for ``cecai-convert check``: a builder's files checked on the pair's runtime, in its image.

    The files are mounted read-only at ``/job/files`` and the record's folder writable at ``/job/checks``; there is
    no network, and the pair's GPUs (``--gpus all``, or the nvidia runtime on Jetson) as for a conversion.
    """
    uid, gid, as_image_user = _container_user(uid_gid)
    chosen = image or default_image(pair, environ)
    inside = CONTAINER_JOB_DIR / "checks" / record.name
    command = [*(["-v"] if verbose else []), "check", str(CONTAINER_JOB_DIR / "files"), "--pair", pair.name,
               "--record", str(inside), "--backend", "local"]  # fmt: skip
    if limits is not None:
        command += ["--max-kld", repr(limits.max_kld), "--min-top1", repr(limits.min_top1)]
    if n_gpu_layers is not None:
        command += ["--n-gpu-layers", str(n_gpu_layers)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if fidelity != "auto":
        command += ["--fidelity", fidelity]
    return ContainerSpec(
        pair=pair,
        image=chosen,
        entrypoint=("cecai-convert",),
        command=tuple(command),
        mounts=(
            Mount(folder, str(CONTAINER_JOB_DIR / "files"), read_only=True),
            Mount(record.parent, str(CONTAINER_JOB_DIR / "checks"), read_only=False),
        ),
        user=f"{uid}:{gid}",
        network_mode="none",
        gpus=pair.docker_gpus,
        runtime=pair.docker_runtime,
        environment=MappingProxyType(
            {
                "HOME": _CONTAINER_HOME,
                environment.IN_CONTAINER: "1",
                environment.CHECK_BACKEND: "docker",
                environment.CHECK_IMAGE: chosen,
            }
        ),
        passthrough_env=_PASS_ALWAYS,
        labels=MappingProxyType({CONTAINER_LABEL: __version__, "io.cecai.pair": pair.name}),
        make_dirs=(record.parent,),
        chown_dirs=(record.parent,) if as_image_user else (),
        read_dirs=(folder,),
        watch_dirs=(),
    )
