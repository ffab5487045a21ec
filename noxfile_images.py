"""nox sessions that use the pair images; noxfile.py imports this module, which registers them.

    nox -s convert-cpu -- PATH [options]        `cecai-convert run PATH --pair CPU_LLM_LLAMA --backend local [...]`
    nox -s convert-gpu -- PATH [options]        `cecai-convert run PATH --pair GPU_LLM_LLAMA --backend docker [...]`
    nox -s convert-arm -- PATH [options]        the same for ARM_LLM_LLAMA
    nox -s convert-agx-orin -- PATH [options]   the same for AGX_ORIN_LLM_LLAMA
    nox -s build-images [-- TARGET ...]         `docker buildx bake [TARGET ...]`; without buildx, the CPU image
                                                with a plain build (scripts/build-cpu-image.sh)

convert-cpu converts on this machine (``--backend local``); the other pairs run in the pair's image
(``--backend docker``), which needs only the package and the docker SDK here: no torch, no llama.cpp. CECAI_BACKEND,
or ``--backend`` after ``--``, chooses otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).parent
#: session name → (pair, default backend): the CPU pair converts here, the others in their pair's image.
CONVERT_SESSIONS = {
    "convert-cpu": ("CPU_LLM_LLAMA", "local"),
    "convert-gpu": ("GPU_LLM_LLAMA", "docker"),
    "convert-arm": ("ARM_LLM_LLAMA", "docker"),
    "convert-agx-orin": ("AGX_ORIN_LLM_LLAMA", "docker"),
}


def _convert(session: nox.Session, pair: str, default_backend: str) -> None:
    if not session.posargs:
        session.error(f"usage: nox -s {session.name} -- path/to/<NAME>/Converter [cecai-convert run options]")
    path, *options = session.posargs
    backend = os.environ.get("CECAI_BACKEND", default_backend)
    for i, option in enumerate(options):  # the last --backend wins, as in argparse
        if option == "--backend" and i + 1 < len(options):
            backend = options[i + 1]
        elif option.startswith("--backend="):
            backend = option.partition("=")[2]
    wheels = os.environ.get("CECAI_WHEEL_CACHE", str(Path.home() / ".cache" / "cecai-converter" / "wheels"))
    session.install("--find-links", wheels, "-e", ".[local]" if backend == "local" else ".[docker]")
    session.run("cecai-convert", "run", path, "--pair", pair, "--backend", backend, *options)


def _make_convert_session(name: str, pair: str, default_backend: str) -> None:
    def session_func(session: nox.Session) -> None:
        _convert(session, pair, default_backend)

    where = "here" if default_backend == "local" else "in its image"
    session_func.__doc__ = f"Convert a Converter folder for {pair} {where}: nox -s {name} -- PATH [options]."
    session_func.__name__ = name.replace("-", "_")
    nox.session(name=name, default=False)(session_func)


for _name, (_pair, _backend) in CONVERT_SESSIONS.items():
    _make_convert_session(_name, _pair, _backend)


def _has_buildx() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "buildx", "version"], capture_output=True, check=False).returncode == 0


@nox.session(name="build-images", python=False, default=False)
def build_images(session: nox.Session) -> None:
    """Build the pair images with docker buildx bake (or, without buildx, the CPU image with a plain build)."""
    targets = session.posargs or ["default"]
    if _has_buildx():
        session.run("docker", "buildx", "bake", "--file", str(ROOT / "docker-bake.hcl"), *targets, external=True)
        return
    session.warn(
        "docker buildx is not available, so `docker buildx bake` cannot run here: only the CPU image can be built, "
        "with a plain build (podman or docker). Install the buildx plugin to build every pair "
        "(https://github.com/docker/buildx#installing); build arm64 images on an arm64 machine."
    )
    if set(targets) - {"default", "cpu", "amd64"}:
        session.error(f"without buildx only the cpu target can be built, not: {', '.join(targets)}")
    session.run("bash", str(ROOT / "scripts" / "build-cpu-image.sh"), external=True)
