"""doctor's whole diagnosis: which checks a runner of a role, backend and pair gets (:func:`checks_for`), run in
order into a :class:`Report` (:func:`diagnose`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import UsageError
from ..pairs import PAIRS, PairInfo
from .engine import Engine, check_engine, check_image, check_nvidia_runtime, pair_default_image
from .probes import (
    Finding,
    check_cmake,
    check_compilers,
    check_disk,
    check_gpu,
    check_nvcc,
    check_python,
    check_venv,
)

ROLES: Final = ("builder", "check")


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
    engine = Engine(env) if backend == "docker" else None
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
            finding = check_image(engine, engine_ok, pair, image or pair_default_image(pair, env))
        elif name == "NVIDIA runtime" and pair is not None:
            finding = check_nvidia_runtime(pair, engine_ok, info, env)
        else:  # "disk"
            finding = check_disk(role, model_bytes, path or Path.cwd())
        report.findings.append(finding)
    return report
