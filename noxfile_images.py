"""nox sessions that use the pair images; noxfile.py imports this module, which registers them.

    nox -s convert-cpu -- PATH [options]        `cecai-convert run PATH --pair CPU_LLM_LLAMA [...]`
    nox -s convert-gpu -- PATH [options]        `cecai-convert run PATH --pair GPU_LLM_LLAMA [...]`
    nox -s convert-arm -- PATH [options]        the same for ARM_LLM_LLAMA
    nox -s convert-agx-orin -- PATH [options]   the same for AGX_ORIN_LLM_LLAMA
    nox -s build-images [-- TARGET ...]         `docker buildx bake [TARGET ...]`; without buildx, each pair of
                                                the targets with scripts/build-image.sh
    nox -s check-arm                            the arm64 image built on x86-64 (cross-compiled llama.cpp, QEMU),
                                                a conversion in it compared byte for byte with one made here, and
                                                `cecai-convert check` of this machine's files under the arm64 image

The convert sessions come from the pair table (src/cecai_converter/pairs.py), one per pair. Like the per-pair
scripts, they tell the CLI who is calling (CECAI_ENTRY=pair-script) and the CLI picks the backend
(cecai_converter.backends.default_backend: ``--backend``, else CECAI_BACKEND, else the pair's image, as the seed flow
did). The docker backend needs only the package and the docker SDK here: no torch, no llama.cpp;
``--backend local`` (or CECAI_BACKEND=local) converts on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "src"))  # the pair table, without installing the package into nox's own Python
from cecai_converter.backends import ENTRY_ENV, default_backend  # noqa: E402
from cecai_converter.fsutil import sha256_file  # noqa: E402
from cecai_converter.pairs import PAIRS  # noqa: E402

#: session name → (pair, its description), one per pair of the table.
CONVERT_SESSIONS = {f"convert-{pair.slug}": (pair.name, pair.description) for pair in PAIRS.values()}


def _convert(session: nox.Session, pair: str) -> None:
    if not session.posargs:
        session.error(f"usage: nox -s {session.name} -- path/to/<NAME>/Converter [cecai-convert run options]")
    path, *options = session.posargs
    # Only to choose the extra to install (docker needs no torch); the CLI decides the backend itself.
    entry = {ENTRY_ENV: "pair-script"}
    backend = default_backend({**os.environ, **entry})
    for i, option in enumerate(options):  # the last --backend wins, as in argparse
        if option == "--backend" and i + 1 < len(options):
            backend = options[i + 1]
        elif option.startswith("--backend="):
            backend = option.partition("=")[2]
    wheels = os.environ.get("CECAI_WHEEL_CACHE", str(Path.home() / ".cache" / "cecai-converter" / "wheels"))
    if backend == "local":
        # ./dev's torch decision: the CPU build where the PyTorch CPU index answers, else what pip will download.
        session.run("python", "scripts/lib/dev_install.py", "torch")
    session.install("--find-links", wheels, "-e", ".[local]" if backend == "local" else ".[docker]")
    session.run("cecai-convert", "run", path, "--pair", pair, *options, env=entry)


def _make_convert_session(name: str, pair: str, description: str) -> None:
    def session_func(session: nox.Session) -> None:
        _convert(session, pair)

    session_func.__doc__ = f"Convert a Converter folder for {pair} ({description}): nox -s {name} -- PATH [options]."
    session_func.__name__ = name.replace("-", "_")
    nox.session(name=name, default=False)(session_func)


for _name, (_pair, _description) in CONVERT_SESSIONS.items():
    _make_convert_session(_name, _pair, _description)


def _has_buildx() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "buildx", "version"], capture_output=True, check=False).returncode == 0


def _bake_pairs(targets: list[str]) -> list[str]:
    """The pairs a list of bake targets and groups (default, an architecture, a slug) stands for."""
    slugs: list[str] = []
    for target in targets:
        if target == "default":
            slugs += [p.slug for p in PAIRS.values()]
        elif target in {p.arch for p in PAIRS.values()}:
            slugs += [p.slug for p in PAIRS.values() if p.arch == target]
        elif target in {p.slug for p in PAIRS.values()}:
            slugs.append(target)
        else:
            raise ValueError(f"not a bake target or group of docker-bake.hcl: {target}")
    return list(dict.fromkeys(slugs))


@nox.session(name="build-images", python=False, default=False)
def build_images(session: nox.Session) -> None:
    """Build the pair images with docker buildx bake (or, without buildx, each with scripts/build-image.sh)."""
    targets = session.posargs or ["default"]
    if _has_buildx():
        session.run("docker", "buildx", "bake", "--file", str(ROOT / "docker-bake.hcl"), *targets, external=True)
        return
    try:
        slugs = _bake_pairs(targets)
    except ValueError as exc:
        session.error(str(exc))
    session.warn(
        "docker buildx is not available: building with scripts/build-image.sh (podman or docker) instead. The CUDA "
        "and L4T bases must be pullable; another architecture needs QEMU (see docs/images.md)."
    )
    for slug in slugs:
        session.run("bash", str(ROOT / "scripts" / "build-image.sh"), slug, external=True)


def _readable(root: Path) -> None:
    """``chmod -R a+rX``: a root caller's containers run as the images' uid 10001, which must read the model."""
    for path in (root, *root.rglob("*")):
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))


@nox.session(name="check-arm", default=False)
def check_arm(session: nox.Session) -> None:
    """Build the arm64 image here (cross-compiled llama.cpp, QEMU), convert in it, compare with x86-64, check.

    Env: CECAI_CHECK_ARM_DIR (work folder, default .nox/check-arm-work), CECAI_TORCH_VERSION (passed to
    scripts/build-image.sh), CECAI_PRECISIONS (default "Q8_0 Q4_K_M"). Writes DIR/check-arm.json: durations, the
    SHA-256 of each file on each architecture and whether they are equal, and the check's exit status. The bytes are
    reported, not asserted: llama.cpp's K-quants may round differently on arm64 (see docs/images.md).
    """
    wheels = os.environ.get("CECAI_WHEEL_CACHE", str(Path.home() / ".cache" / "cecai-converter" / "wheels"))
    session.install("--find-links", wheels, "-e", ".[local,docker]")
    work = Path(os.environ.get("CECAI_CHECK_ARM_DIR", str(ROOT / ".nox" / "check-arm-work"))).resolve()
    precisions = os.environ.get("CECAI_PRECISIONS", "Q8_0 Q4_K_M").split()
    durations: dict[str, float] = {}

    def timed(step: str, *args: str) -> None:
        start = time.monotonic()
        session.run(*args)
        durations[step] = round(time.monotonic() - start, 1)
        session.log(f"{step}: {durations[step]} s")

    pair = PAIRS["ARM_LLM_LLAMA"]
    start = time.monotonic()
    session.run("bash", str(ROOT / "scripts" / "build-image.sh"), pair.name, external=True, silent=False)
    durations["build arm64 image"] = round(time.monotonic() - start, 1)
    session.log(f"build arm64 image: {durations['build arm64 image']} s")
    repo = os.environ.get("CECAI_IMAGE_REPO", "localhost/cecai-converter")
    from cecai_converter import __version__

    image = f"{repo}:{__version__}-{pair.slug}"
    if work.exists():
        shutil.rmtree(work)
    model = work / "models" / "tiny"
    timed(
        "make the tiny model",
        "python",
        "-c",
        "import sys; from pathlib import Path; from cecai_converter.modelgen import build_model; "
        "build_model(Path(sys.argv[1]), 'llama', size='tiny')",
        str(model),
    )
    if not model.is_dir():
        return  # `nox --install-only`: nothing ran
    _readable(work)
    options = [arg for p in precisions for arg in ("--precision", p)]
    amd64, arm64 = work / "amd64", work / "arm64"
    timed("convert on x86-64", "cecai-convert", "convert", str(model), *options, "--outdir", str(amd64))
    timed(
        "convert in the arm64 image (QEMU)",
        "cecai-convert",
        "convert",
        str(model),
        *options,
        "--outdir",
        str(arm64),
        "--pair",
        pair.name,
        "--backend",
        "docker",
        "--image",
        image,
        "--no-fidelity",
    )
    files = {}
    for precision in precisions:
        ours, theirs = (
            [f for f in d.glob("*.gguf") if f.name.lower().endswith(f".{precision.lower()}.gguf")]
            for d in (amd64, arm64)
        )
        if len(ours) != 1 or len(theirs) != 1:
            session.error(f"{precision}: expected one file each, found {ours} and {theirs}")
        a, b = sha256_file(ours[0]), sha256_file(theirs[0])
        files[precision] = {"file": ours[0].name, "amd64_sha256": a, "arm64_sha256": b, "equal": a == b}
        session.log(f"{precision}: x86-64 {a[:16]}…  arm64 {b[:16]}…  {'EQUAL' if a == b else 'DIFFERENT'}")
    # The files made here, checked on the arm64 runtime: the builder/checker split the project works by.
    # The record goes next to, not into, the builder's folder: that folder stays as `convert` made it.
    record = work / "checks" / f"tiny.{pair.slug}.check.json"
    record.parent.mkdir(parents=True)
    check_start = time.monotonic()
    proc = subprocess.run(
        [
            *("cecai-convert", "check", str(amd64), "--pair", pair.name),
            *("--backend", "docker", "--image", image, "--record", str(record)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{Path(session.bin)}{os.pathsep}{os.environ['PATH']}"},
        check=False,
    )
    durations["check x86-64 files in the arm64 image (QEMU)"] = round(time.monotonic() - check_start, 1)
    session.log(proc.stdout + proc.stderr)
    result = {
        "image": image,
        "precisions": files,
        "check": {
            "exit_status": proc.returncode,
            "record": str(record),
            "output": (proc.stdout + proc.stderr)[-8000:],
        },
        "durations_s": durations,
    }
    (work / "check-arm.json").write_text(json.dumps(result, indent=2) + "\n")
    session.log(json.dumps({"durations_s": durations, "equal": {p: f["equal"] for p, f in files.items()}}))
    if proc.returncode != 0:
        session.error(f"cecai-convert check failed on the arm64 image (exit {proc.returncode})")
