"""The docker backend: the container specification (pure, no engine) and real runs on a container engine.

* ``test_spec_*``: what :func:`container_spec` decides for each pair, the GPU and Jetson ones included (no GPU runs
  here, so those are specification tests by name).
* ``@pytest.mark.engine``: the real CPU image, built from images/Dockerfile on the engine ``DOCKER_HOST`` names
  (podman's Docker-compatible API in CI: ``bash scripts/start-podman.sh``), converting a small model. Skipped with a
  reason when no engine answers, except where ``CECAI_REQUIRE`` names ``engine`` (``./dev test``, CI), where they
  fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import engine, sigint_default, tree_digest

from cecai_converter import __version__
from cecai_converter.backends.container_spec import (
    CONTAINER_LABEL,
    DEFAULT_IMAGE_REPO,
    IMAGE_GID,
    IMAGE_UID,
    ContainerSpec,
    Mount,
    container_spec,
    default_image,
)
from cecai_converter.backends.docker import (
    ContainerFailed,
    EngineUnreachable,
    ImageNotFound,
    build_command_hint,
    check_readable,
    connect,
    run_container,
    run_jobs,
    unreadable_paths,
)
from cecai_converter.config import PairJob, load_converter_dir
from cecai_converter.errors import ConfigError, UsageError
from cecai_converter.fsutil import STAGING_PREFIX
from cecai_converter.output import Output
from cecai_converter.pairs import PAIRS
from cecai_converter.request import REQUEST_ENV, Request, resolve

ROOT = Path(__file__).resolve().parents[1]
USER = (1000, 1000)


def _layout(
    root: Path,
    *,
    pairs: tuple[str, ...] = tuple(PAIRS),
    model_name: str = "tiny-llama",
    with_model: bool = True,
    extra: dict[str, object] | None = None,
) -> Path:
    """A Converter folder in the seed layout (configuration only; the model folder is empty)."""
    converter = root / "GPT_2" / "Converter"
    config = converter / "configurations"
    config.mkdir(parents=True)
    general = {"IMAGE_NAME": None, "MODEL_NAME": model_name, "TRAINED": False, **(extra or {})}
    (config / "converter_args.yaml").write_text(yaml.safe_dump({k: v for k, v in general.items() if v is not None}))
    for pair in pairs:
        (config / pair).mkdir()
        (config / pair / PAIRS[pair].config_filename).write_text("PRECISION: [Q8_0, Q4_K_M]\n")
    if with_model:
        (converter / "models" / model_name).mkdir(parents=True)
    return converter


def _job(converter: Path, pair: str) -> PairJob:
    return load_converter_dir(converter, [pair])[0]


def _request(
    job: PairJob, cli: dict[str, object] | None = None, environ: dict[str, str] | None = None, cwd: Path | None = None
) -> Request:
    """The job's request as ``run`` resolves it (its YAML, then ``environ``, then ``cli``)."""
    return resolve(
        cli or {}, job.settings, environ or {}, config_dir=job.config_dir, yaml_where=str(job.pair_file), cwd=cwd
    )


def _spec(job: PairJob, request: Request | None = None, **kwargs: Any) -> ContainerSpec:
    return container_spec(job, request or _request(job), **kwargs)


def _sent(spec: ContainerSpec) -> Request:
    """The request the container receives, as its CLI reads it back."""
    return Request.from_json(spec.environment[REQUEST_ENV])


# -- specification tests --------------------------------------------------------------------------------------------
def test_spec_cpu_mounts_user_network_and_command(tmp_path: Path) -> None:
    converter = _layout(tmp_path)
    spec = _spec(_job(converter, "CPU_LLM_LLAMA"), uid_gid=USER, environ={})
    assert spec.image == f"{DEFAULT_IMAGE_REPO}:{__version__}-cpu"
    assert spec.entrypoint == ("cecai-convert",)
    assert spec.command == (
        "--format", "human", "run", "/job", "--pair", "CPU_LLM_LLAMA", "--backend", "local",
        "--models-path", "/job/models", "--outputs-path", "/job/outputs", "--logs-path", "/job/logs",
        "--request", "env:CECAI_REQUEST",
    )  # fmt: skip
    assert spec.mounts == (
        Mount(converter / "configurations", "/job/configurations", read_only=True),
        Mount(converter / "models", "/job/models", read_only=True),
        Mount(converter / "outputs", "/job/outputs", read_only=False),
        Mount(converter / "logs", "/job/logs", read_only=False),
    )
    assert spec.user == "1000:1000"
    assert spec.network_mode == "none", "the model is on disk: no network"
    assert not spec.gpus and spec.device_requests == [] and spec.runtime is None
    kwargs = spec.create_kwargs(environ={})
    assert kwargs["volumes"][str(converter / "models")] == {"bind": "/job/models", "mode": "ro"}
    assert kwargs["network_mode"] == "none" and kwargs["user"] == "1000:1000"
    assert "device_requests" not in kwargs and "runtime" not in kwargs
    assert kwargs["labels"][CONTAINER_LABEL] == __version__


def test_spec_gpu_requests_every_gpu(tmp_path: Path) -> None:
    spec = _spec(_job(_layout(tmp_path), "GPU_LLM_LLAMA"), uid_gid=USER, environ={})
    assert spec.image.endswith(f":{__version__}-gpu")
    assert spec.gpus and spec.runtime is None
    assert spec.device_requests == [
        {"Driver": "", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]], "Options": {}}
    ]
    (request,) = spec.create_kwargs(environ={})["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    argv = spec.docker_run_args()
    assert argv[argv.index("--gpus") + 1] == "all" and "--runtime" not in argv


def test_spec_agx_orin_uses_the_nvidia_runtime(tmp_path: Path) -> None:
    spec = _spec(_job(_layout(tmp_path), "AGX_ORIN_LLM_LLAMA"), uid_gid=USER, environ={})
    assert spec.image.endswith(f":{__version__}-agx-orin")
    assert spec.runtime == "nvidia" and not spec.gpus
    kwargs = spec.create_kwargs(environ={})
    assert kwargs["runtime"] == "nvidia" and "device_requests" not in kwargs
    argv = spec.docker_run_args()
    assert argv[argv.index("--runtime") + 1] == "nvidia" and "--gpus" not in argv


def test_spec_arm_is_a_plain_cpu_container(tmp_path: Path) -> None:
    spec = _spec(_job(_layout(tmp_path), "ARM_LLM_LLAMA"), uid_gid=USER, environ={})
    assert spec.image.endswith(f":{__version__}-arm")
    assert not spec.gpus and spec.runtime is None and spec.network_mode == "none"


def test_spec_root_caller_runs_as_the_image_user(tmp_path: Path) -> None:
    job = _job(_layout(tmp_path), "CPU_LLM_LLAMA")
    spec = _spec(job, uid_gid=(0, 0), environ={})
    assert spec.user == f"{IMAGE_UID}:{IMAGE_GID}", "never root inside the container"
    assert spec.chown_dirs == (job.outputs_dir, job.logs_dir)
    assert _spec(job, uid_gid=USER, environ={}).chown_dirs == ()


def test_spec_unreadable_model_is_found_before_the_start(tmp_path: Path) -> None:
    converter = _layout(tmp_path)
    weights = converter / "models" / "tiny-llama" / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)  # what safetensors writes
    job = _job(converter, "CPU_LLM_LLAMA")
    as_root = _spec(job, uid_gid=(0, 0), environ={})
    assert unreadable_paths(as_root) == [weights], "uid 10001 may not read a root-owned 0600 file"
    with pytest.raises(UsageError, match="could not read") as info:
        check_readable(as_root)
    assert "chmod -R a+rX" in (info.value.hint or "")
    owner = weights.stat()
    if owner.st_uid != 0:  # a non-root caller's container runs as the caller, who owns the file
        assert unreadable_paths(_spec(job, uid_gid=(owner.st_uid, owner.st_gid), environ={})) == []
    weights.chmod(0o644)
    assert unreadable_paths(as_root) == []


def test_spec_image_choice(tmp_path: Path) -> None:
    job = _job(_layout(tmp_path, extra={"IMAGE_NAME": "registry.example/team/conv:7"}), "CPU_LLM_LLAMA")
    assert _spec(job, uid_gid=USER, environ={}).image == "registry.example/team/conv:7", "IMAGE_NAME"
    assert _spec(job, image="mine:1", uid_gid=USER, environ={}).image == "mine:1", "--image wins"
    plain = _job(_layout(tmp_path / "b"), "GPU_LLM_LLAMA")
    assert _spec(plain, uid_gid=USER, environ={"CECAI_IMAGE_REPO": "localhost/cc"}).image == (
        f"localhost/cc:{__version__}-gpu"
    )
    env = {"CECAI_IMAGE_TEMPLATE": "{repo}/{slug}:{version}", "CECAI_IMAGE_REPO": "r.io/x"}
    assert default_image(PAIRS["AGX_ORIN_LLM_LLAMA"], env) == f"r.io/x/agx-orin:{__version__}"
    with pytest.raises(ConfigError, match="CECAI_IMAGE_TEMPLATE"):
        default_image(PAIRS["CPU_LLM_LLAMA"], {"CECAI_IMAGE_TEMPLATE": "{repo}:{tag}"})


def test_spec_network_and_token_only_when_the_model_must_be_downloaded(tmp_path: Path) -> None:
    job = _job(_layout(tmp_path, with_model=False), "CPU_LLM_LLAMA")
    spec = _spec(job, uid_gid=USER, environ={})
    assert spec.network_mode is None
    assert "HF_TOKEN" in spec.passthrough_env
    secret = "hf_not_a_real_token_123"
    assert secret not in repr(spec), "values are read at run time, never kept in the spec"
    assert spec.create_kwargs(environ={"HF_TOKEN": secret})["environment"]["HF_TOKEN"] == secret
    local = _spec(_job(_layout(tmp_path / "b"), "CPU_LLM_LLAMA"), uid_gid=USER, environ={})
    assert "HF_TOKEN" not in local.create_kwargs(environ={"HF_TOKEN": secret})["environment"]


def test_spec_nested_model_name_mounts_models_path(tmp_path: Path) -> None:
    converter = _layout(tmp_path, model_name="org/tiny")
    spec = _spec(_job(converter, "CPU_LLM_LLAMA"), uid_gid=USER, environ={})
    assert Mount(converter / "models", "/job/models", read_only=True) in spec.mounts


def test_spec_format_and_verbose_follow_the_caller(tmp_path: Path) -> None:
    job = _job(_layout(tmp_path), "CPU_LLM_LLAMA")
    spec = _spec(job, fmt="json", verbose=True, uid_gid=USER)
    assert spec.command[:4] == ("-v", "--format", "json", "run")


def test_spec_sends_the_resolved_request_as_json_not_flags(tmp_path: Path) -> None:
    job = _job(_layout(tmp_path, extra={"KEEP_BASE": True, "THREADS": 3}), "CPU_LLM_LLAMA")
    request = _request(job, {"force": True, "threads": 2}, {"CECAI_FIDELITY": "0"})
    spec = _spec(job, request, uid_gid=USER, environ={})
    assert spec.command[-2:] == ("--request", f"env:{REQUEST_ENV}")
    assert not {"--force", "--threads", "--keep-base", "--no-fidelity"} & set(spec.command), "no rebuilt flags"
    sent = _sent(spec)
    assert sent == request, "the same values and sources, read back as the container reads them"
    assert (sent["force"], sent["threads"], sent["keep_base"], sent["fidelity"]) == (True, 2, True, False)
    assert (sent.sources["threads"], sent.sources["keep_base"], sent.sources["fidelity"]) == ("cli", "yaml", "env")
    argv = spec.docker_run_args()
    assert f"{REQUEST_ENV}={request.to_json()}" in argv, "the printed docker run line carries it too"
    assert spec.create_kwargs(environ={})["environment"][REQUEST_ENV] == request.to_json()


def test_spec_request_files_become_read_only_mounts(tmp_path: Path) -> None:
    job = _job(_layout(tmp_path), "CPU_LLM_LLAMA")
    calib = tmp_path / "calib.txt"
    calib.write_text("text")
    spec = _spec(job, _request(job, {"calibration_text": "calib.txt", "imatrix": "auto"}, cwd=tmp_path), uid_gid=USER)
    assert Mount(calib, "/job/inputs/0/calib.txt", read_only=True) in spec.mounts
    sent = _sent(spec)
    assert sent["calibration_text"] == Path("/job/inputs/0/calib.txt") and sent["imatrix"] == "auto"
    assert sent.sources["calibration_text"] == "cli"
    with pytest.raises(UsageError, match=r"--imatrix .*missing.dat: no such file"):
        _spec(job, _request(job, {"imatrix": str(tmp_path / "missing.dat")}), uid_gid=USER)
    with pytest.raises(UsageError, match=r"CECAI_EVAL_TEXT .*gone.txt: no such file"):
        _spec(job, _request(job, environ={"CECAI_EVAL_TEXT": str(tmp_path / "gone.txt")}), uid_gid=USER)


def test_spec_yaml_file_keys_inside_the_converter_folder_are_mounted_from_the_resolved_paths(tmp_path: Path) -> None:
    converter = _layout(tmp_path, extra={"EVAL_TEXT": "../eval.txt", "IMATRIX": "imatrix.dat"})
    (converter / "eval.txt").write_text("text")
    (converter / "configurations" / "imatrix.dat").write_bytes(b"m")
    spec = _spec(_job(converter, "CPU_LLM_LLAMA"), uid_gid=USER, environ={})
    # One resolution (request.py, against configurations/): each file gets its own read-only mount.
    assert Mount(converter / "configurations" / "imatrix.dat", "/job/inputs/0/imatrix.dat", read_only=True) in (
        spec.mounts
    )
    assert Mount(converter / "eval.txt", "/job/inputs/1/eval.txt", read_only=True) in spec.mounts
    assert len(spec.mounts) == 6
    sent = _sent(spec)
    assert sent["eval_text"] == Path("/job/inputs/1/eval.txt") and sent.sources["eval_text"] == "yaml"
    with pytest.raises(UsageError, match=r"IMATRIX .*no such file"):
        _spec(_job(_layout(tmp_path / "b", extra={"IMATRIX": "none.dat"}), "CPU_LLM_LLAMA"), uid_gid=USER)


@pytest.mark.parametrize("value", ["../../../eval.txt", "/proc/self/environ", "link.txt"])
def test_spec_a_yaml_file_key_outside_the_converter_folder_is_refused(tmp_path: Path, value: str) -> None:
    """A shipped Converter folder must not make the container mount (or the converter read) a host file."""
    converter = _layout(tmp_path / "c", extra={"EVAL_TEXT": value})
    (tmp_path / "eval.txt").write_text("text")
    (converter / "configurations" / "link.txt").symlink_to("/proc/self/environ")
    with pytest.raises(ConfigError, match=r"EVAL_TEXT: .* points outside the Converter folder"):
        _spec(_job(converter, "CPU_LLM_LLAMA"), uid_gid=USER, environ={})


@pytest.mark.parametrize("outputs", ["..", "../models"])
def test_spec_an_outputs_root_around_the_model_is_refused(tmp_path: Path, outputs: str) -> None:
    """The outputs root is mounted writable: it must not make the model folder writable in the container."""
    converter = _layout(tmp_path, extra={"OUTPUTS_PATH": outputs})
    with pytest.raises(ConfigError, match=r"OUTPUTS_PATH .* holds (the model folder|configurations/)"):
        _spec(_job(converter, "CPU_LLM_LLAMA"), uid_gid=USER, environ={})


def test_spec_a_given_system_file_is_never_mounted(tmp_path: Path) -> None:
    job = _job(_layout(tmp_path), "CPU_LLM_LLAMA")
    with pytest.raises(UsageError, match=r"--eval-text /proc/\S+/environ: a system file, not an input"):
        _spec(job, _request(job, {"eval_text": "/proc/self/environ"}), uid_gid=USER)


def test_build_command_hint_says_how_to_get_the_image() -> None:
    cpu = PAIRS["CPU_LLM_LLAMA"]
    published = build_command_hint(default_image(cpu, {}), cpu)
    assert published.startswith(f"pull it:  docker pull {DEFAULT_IMAGE_REPO}:")
    assert "docker buildx bake cpu" in published and "scripts/build-image.sh cpu" in published
    local = build_command_hint("localhost/conv:dev", PAIRS["GPU_LLM_LLAMA"])
    assert local.startswith("build it:  docker buildx bake gpu")
    assert "scripts/build-image.sh gpu localhost/conv:dev" in local


def test_engine_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    # Needs no engine: nothing listens on this socket.
    dead = f"unix://{tmp_path}/no-engine.sock"
    with pytest.raises(EngineUnreachable) as info:
        connect({"DOCKER_HOST": dead})
    assert dead in info.value.message and "DOCKER_HOST" in (info.value.hint or "")
    converter = _layout(tmp_path / "c", pairs=("CPU_LLM_LLAMA",))
    proc = subprocess.run(
        [sys.executable, "-m", "cecai_converter", "run", str(converter), "--backend", "docker"],
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_HOST": dead},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "no container engine answers" in proc.stderr and "scripts/start-podman.sh" in proc.stderr


# -- real engine ----------------------------------------------------------------------------------------------------
@pytest.fixture
def seed(tmp_path: Path) -> Callable[[str], Path]:
    """A seed-layout Converter folder with a real small model; the name is unique per test (a container label)."""
    from cecai_converter.modelgen import make_seed_layout

    def make(name: str) -> Path:
        return _readable(make_seed_layout(tmp_path / name, model_name=name))

    return make


def _readable(converter: Path) -> Path:
    """``chmod -R a+rX``: safetensors files are written 0600, and a root caller's container runs as uid 10001."""
    for path in (converter, *converter.rglob("*")):
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    return converter


def _cli(*args: str | Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cecai_converter", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _ggufs(converter: Path) -> dict[str, bytes]:
    out = converter / "outputs" / "CPU_LLM_LLAMA"
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.gguf"))}


def _leftovers(converter: Path) -> list[Path]:
    return [p for p in (converter / "outputs").rglob("*") if p.name.startswith((STAGING_PREFIX, "."))]


def _containers(model: str) -> list[object]:
    client = connect()
    try:
        return client.containers.list(all=True, filters={"label": f"io.cecai.model={model}"})
    finally:
        client.close()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The local backend's outputs for the default seed model, converted on this machine."""
    from cecai_converter.modelgen import make_seed_layout

    converter = make_seed_layout(tmp_path_factory.mktemp("local") / "GPT_2")
    proc = _cli("run", converter, "--backend", "local")
    assert proc.returncode == 0, proc.stderr
    return _ggufs(converter)


@pytest.mark.slow
@pytest.mark.engine
@engine
def test_engine_docker_backend_matches_local(cpu_image: str, local_reference: dict[str, bytes], tmp_path: Path) -> None:
    from cecai_converter.modelgen import make_seed_layout

    converter = _readable(make_seed_layout(tmp_path / "GPT_2"))  # same model bytes as the reference
    model_before = tree_digest(converter / "models")
    proc = _cli("run", converter, "--backend", "docker", "--image", cpu_image)
    assert proc.returncode == 0, proc.stderr
    assert "network none" in proc.stderr
    docker_outputs = _ggufs(converter)
    assert sorted(docker_outputs) == ["tiny-llama.q4_k_m.gguf", "tiny-llama.q8_0.gguf"]
    assert docker_outputs == local_reference, "the image converts to the same bytes as the local backend"
    manifest = json.loads((converter / "outputs" / "CPU_LLM_LLAMA" / "manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} == set(docker_outputs)
    # non-root inside the container; the model was mounted read-only and is unchanged
    owner = (converter / "outputs" / "CPU_LLM_LLAMA" / "manifest.json").stat().st_uid
    assert owner == (IMAGE_UID if os.getuid() == 0 else os.getuid())
    assert owner != 0
    assert tree_digest(converter / "models") == model_before
    assert not _leftovers(converter)
    assert not _containers("tiny-llama"), "the container was removed"


@pytest.mark.slow
@pytest.mark.engine
@engine
def test_engine_seed_script_converts_in_the_image(
    cpu_image: str, local_reference: dict[str, bytes], tmp_path: Path
) -> None:
    from cecai_converter.modelgen import make_seed_layout

    converter = _readable(make_seed_layout(tmp_path / "GPT_2"))  # IMAGE_NAME: the published CPU tag
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "converter_cpu_llm_llama.sh"), str(converter)],
        capture_output=True,
        text=True,
        # No --backend and no CECAI_BACKEND: the per-pair script's default (the CLI's ENTRY_DEFAULTS) is the image.
        env={
            **{k: v for k, v in os.environ.items() if k not in ("CECAI_BACKEND", "CECAI_ENTRY")},
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{DEFAULT_IMAGE_REPO}:{__version__}-cpu" in proc.stderr
    assert _ggufs(converter) == local_reference
    assert (converter / "logs" / "CPU_LLM_LLAMA" / "Converter_CPU_LLM_LLAMA_tiny-llama.log").is_file()


@pytest.mark.engine
@engine
def test_engine_image_missing(tmp_path: Path) -> None:
    converter = _layout(tmp_path, pairs=("CPU_LLM_LLAMA",))
    missing = "localhost/cecai-converter:no-such-tag"
    with pytest.raises(ImageNotFound) as info:
        jobs = load_converter_dir(converter)
        run_jobs(jobs, [_request(j) for j in jobs], image=missing, out=Output(stderr=io.StringIO()))
    assert missing in info.value.message and "build it:" in (info.value.hint or "")
    proc = _cli("run", converter, "--backend", "docker", "--image", missing)
    assert proc.returncode == 1
    assert f"image {missing}" in proc.stderr and "docker buildx bake cpu" in proc.stderr
    assert not (converter / "outputs").exists(), "nothing ran"


@pytest.mark.slow
@pytest.mark.engine
@engine
def test_engine_failing_container_status_reaches_the_caller(
    cpu_image: str, seed: Callable[[str], Path], tmp_path: Path
) -> None:
    converter = seed("broken-model")
    weights = converter / "models" / "broken-model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    proc = _cli("run", converter, "--backend", "docker", "--image", cpu_image)
    assert proc.returncode == 2, proc.stderr  # the container's own exit status (bad input)
    assert "failed inside the container for CPU_LLM_LLAMA (exit 2)" in proc.stderr
    assert not list((converter / "outputs").rglob("*.gguf")) and not _leftovers(converter)
    assert not _containers("broken-model")
    # run_container reports any status unchanged
    job = load_converter_dir(converter)[0]
    spec = _spec(job, image=cpu_image)
    spec = dataclasses.replace(spec, environment={**spec.environment, REQUEST_ENV: '{"values": {}}'})
    client = connect()
    try:
        err = io.StringIO()
        assert run_container(client, spec, Output(stderr=err)) == 2
        assert "--request env:CECAI_REQUEST is not a cecai-converter request" in err.getvalue()
    finally:
        client.close()
    with pytest.raises(ContainerFailed) as info:
        run_jobs([job], [_request(job)], image=cpu_image, out=Output(stderr=io.StringIO()))
    assert info.value.exit_code == 2 and info.value.return_code == 2


@pytest.mark.slow
@pytest.mark.engine
@engine
def test_engine_ctrl_c_removes_the_container(cpu_image: str, seed: Callable[[str], Path]) -> None:
    converter = seed("interrupted-model")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cecai_converter", "run", str(converter), "--backend", "docker", "--image", cpu_image],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_default,  # even when the suite runs in the background with SIGINT ignored
    )
    with _killed_on_exit(proc):
        deadline = time.monotonic() + 120
        while not any(getattr(c, "status", "") == "running" for c in _containers("interrupted-model")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the container never started"
            time.sleep(0.2)
        time.sleep(2)  # let the conversion get going inside
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not _containers("interrupted-model"), "the container is gone"
    assert not list((converter / "outputs").rglob("*.gguf")) and not _leftovers(converter)


@contextlib.contextmanager
def _killed_on_exit(proc: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_spec_convert_mounts_the_model_read_only_and_runs_non_root(tmp_path: Path) -> None:
    from cecai_converter.backends.container_spec import convert_spec
    from cecai_converter.pairs import PAIRS

    model = tmp_path / "m"
    model.mkdir()
    request = resolve({"threads": 2}, {}, {}, command="convert")
    spec = convert_spec(
        str(model), tmp_path / "out", request, pair=PAIRS["GPU_LLM_LLAMA"], model_name="m", image="img",
        precisions=["Q8_0"], uid_gid=(0, 0),
    )  # fmt: skip
    mounts = {m.target: m for m in spec.mounts}
    assert mounts["/job/model"].read_only and mounts["/job/model"].source == model.resolve()
    assert not mounts["/job/outputs"].read_only
    assert spec.user == f"{IMAGE_UID}:{IMAGE_UID}" and spec.network_mode == "none" and spec.gpus
    assert spec.command[:6] == ("convert", "/job/model", "--outdir", "/job/outputs", "--model-name", "m")
    assert spec.command[-6:] == ("--precision", "Q8_0", "--backend", "local", "--request", f"env:{REQUEST_ENV}")
    assert _sent(spec) == request and _sent(spec)["reference"] is True, "convert's own default, resolved outside"
    hub = convert_spec(
        "org/repo", tmp_path / "out", request, pair=PAIRS["AGX_ORIN_LLM_LLAMA"], model_name="repo", precisions=["Q8_0"]
    )
    assert hub.network_mode is None and hub.runtime == "nvidia" and "HF_TOKEN" in hub.passthrough_env
    assert "org/repo" in hub.command and not any(m.target == "/job/model" for m in hub.mounts)


@pytest.mark.slow
@pytest.mark.engine
@engine
def test_engine_convert_command_in_the_image_matches_local(
    cpu_image: str, local_reference: dict[str, bytes], tmp_path: Path
) -> None:
    from cecai_converter.modelgen import make_seed_layout

    converter = _readable(make_seed_layout(tmp_path / "GPT_2"))
    model = converter / "models" / "tiny-llama"
    before = tree_digest(model)
    proc = _cli(
        "convert", model, "--precision", "Q8_0", "--precision", "Q4_K_M", "--outdir", tmp_path / "out",
        "--backend", "docker", "--image", cpu_image, "--format", "json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert Path(result["manifest"]) == tmp_path / "out" / "manifest.json"
    outputs = {p.name: p.read_bytes() for p in sorted((tmp_path / "out").glob("*.gguf"))}
    assert outputs == local_reference
    assert tree_digest(model) == before
    assert not _containers("tiny-llama")
