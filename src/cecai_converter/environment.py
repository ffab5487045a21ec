"""Every ``CECAI_*`` environment variable outside the options table, in one table.

The conversion options have their variables in :data:`cecai_converter.option_table.OPTIONS` (``CECAI_<NAME>``, one per
option: docs/options.md). Every other variable a module, a script, an image or a test reads is a row of
:data:`VARIABLES` here: its name, what it means, who reads it and what holds when it is unset. docs/environment.md
holds the table (``python -m cecai_converter.generate --write``; tests/test_environment.py fails when it is stale or
when a ``CECAI_*`` name appears in the repository without its row).

The package reads its variables through :func:`text` and :func:`is_set`, which refuse a name that is not in the
table. Only the standard library is imported: the ground floor, readable by doctor.py and runtime_build.py, which
run before anything is installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "AUDIENCES",
    "BACKEND",
    "CHECK_BACKEND",
    "CHECK_IMAGE",
    "CORES",
    "CORE_SLOTS",
    "DEBUG",
    "ENTRY",
    "IMAGE_REPO",
    "IMAGE_TEMPLATE",
    "IN_CONTAINER",
    "LOCK_TIMEOUT",
    "NO_PROGRESS",
    "REQUEST",
    "SIGNING_KEY_PASSWORD",
    "SOURCE_RAM_BUDGET",
    "SPLIT_SIZE",
    "THREADS",
    "TOOLCHAIN_DIR",
    "VARIABLES",
    "Audience",
    "Variable",
    "is_set",
    "text",
    "variable",
]

#: Who a variable is for: ``user`` (anyone running the CLI or the actions), ``internal`` (set by the converter for
#: a process it starts), ``build`` (the images, ./dev and the development scripts), ``test`` (the test suite).
Audience = Literal["user", "internal", "build", "test"]
AUDIENCES: Final[tuple[Audience, ...]] = ("user", "internal", "build", "test")


@dataclass(frozen=True)
class Variable:
    """One environment variable.

    Attributes:
        name: the variable (``CECAI_DEBUG``).
        meaning: what it changes, one sentence.
        readers: who reads it (modules of the package, scripts, the actions).
        default: what holds when it is unset or empty.
        audience: who sets it (see :data:`Audience`).
    """

    name: str
    meaning: str
    readers: str
    default: str
    audience: Audience


# The names the package reads, as constants: a typo is an import error, not a variable nobody sets.
DEBUG: Final = "CECAI_DEBUG"
NO_PROGRESS: Final = "CECAI_NO_PROGRESS"
BACKEND: Final = "CECAI_BACKEND"
ENTRY: Final = "CECAI_ENTRY"
IMAGE_REPO: Final = "CECAI_IMAGE_REPO"
IMAGE_TEMPLATE: Final = "CECAI_IMAGE_TEMPLATE"
LOCK_TIMEOUT: Final = "CECAI_LOCK_TIMEOUT"
CORES: Final = "CECAI_CORES"
CORE_SLOTS: Final = "CECAI_CORE_SLOTS"
THREADS: Final = "CECAI_THREADS"
TOOLCHAIN_DIR: Final = "CECAI_TOOLCHAIN_DIR"
SOURCE_RAM_BUDGET: Final = "CECAI_SOURCE_RAM_BUDGET"
SIGNING_KEY_PASSWORD: Final = "CECAI_SIGNING_KEY_PASSWORD"  # noqa: S105 (the name of the variable, no password)
SPLIT_SIZE: Final = "CECAI_SPLIT_SIZE"
REQUEST: Final = "CECAI_REQUEST"
IN_CONTAINER: Final = "CECAI_IN_CONTAINER"
CHECK_BACKEND: Final = "CECAI_CHECK_BACKEND"
CHECK_IMAGE: Final = "CECAI_CHECK_IMAGE"


def _v(name: str, meaning: str, readers: str, default: str, audience: Audience) -> tuple[str, Variable]:
    return name, Variable(name, meaning, readers, default, audience)


#: Every ``CECAI_*`` variable that is not an option's, by audience, then by name.
VARIABLES: Final[Mapping[str, Variable]] = MappingProxyType(
    dict(
        [
            # -- user --------------------------------------------------------------------------------------------
            _v(BACKEND, "the backend of `run` and `convert` when `--backend` is not given (`local` or `docker`)",
               "backends", "the entry point's (`CECAI_ENTRY`)", "user"),
            _v(DEBUG, "any non-empty value: print the traceback of an error, and let llama.cpp attach its debugger "
               "backtrace to an assertion", "cli, errors, tools, fidelity; passed into containers (backends.docker)",
               "off", "user"),
            _v("CECAI_DOCTOR", "`off`: the actions skip `cecai-convert doctor` before installing",
               "actions/doctor.sh", "on", "user"),
            _v(IMAGE_REPO, "the repository of the pair images the docker backend pulls (a fork, a mirror, "
               "`localhost/…`)", "backends.docker, docker-bake.hcl; the actions set it from their own repository",
               "`ghcr.io/cecai/cecai-converter`", "user"),
            _v(IMAGE_TEMPLATE, "how a pair's default image tag is formed (fields: repo, version, slug, pair)",
               "backends.docker, docker-bake.hcl", "`{repo}:{version}-{slug}`", "user"),
            _v(LOCK_TIMEOUT, "seconds a run waits for another run's lock on its outputs folder before it gives up "
               "(exit 1)", "fsutil", "no limit", "user"),
            _v("CECAI_MODEL_SIZE", "the model's size for the doctor's disk check in the actions (`--model-size`)",
               "actions/doctor.sh", "the doctor's own rule", "user"),
            _v(NO_PROGRESS, "any non-empty value: no progress redraws on a terminal (the actions set it)",
               "output; passed into containers (backends.docker)", "progress on a terminal", "user"),
            _v(CORES, "how many cores to share when the machine's count is not the right one", "threads",
               "the affinity mask and cgroup quota", "user"),
            _v(CORE_SLOTS, "the folder of the machine-wide core slots; `off` turns the lease off", "threads",
               "`$TMPDIR/cecai-cores-<uid>`", "user"),
            _v(SIGNING_KEY_PASSWORD, "the password of the private key `sign --key` signs with", "signing_commands",
               "no password", "user"),
            _v(SOURCE_RAM_BUDGET, "the memory the source check may use (bytes, or a number with K, M, G, T)",
               "source_parity", "`MemAvailable`", "user"),
            _v(TOOLCHAIN_DIR, "where the pinned llama.cpp converter and tools are cached", "toolchain, images",
               "`$XDG_CACHE_HOME/cecai-converter/toolchain`", "user"),
            _v("CECAI_WHEEL_CACHE", "where the built llama-cpp-python wheels are kept", "actions/install.sh, ./dev",
               "`~/.cache/cecai-converter/wheels`", "user"),
            # -- internal ----------------------------------------------------------------------------------------
            _v(CHECK_BACKEND, "the backend a check record names (`docker` inside a check container)", "check",
               "local", "internal"),
            _v(CHECK_IMAGE, "the image a check record names (set inside a check container)", "check", "none",
               "internal"),
            _v(ENTRY, "which entry point called the CLI (`pair-script`: the per-pair scripts and nox sessions, "
               "which default to the docker backend)", "backends", "cli", "internal"),
            _v(IN_CONTAINER, "`1` inside a container the docker backend started", "set by backends.docker",
               "unset", "internal"),
            _v(REQUEST, "the resolved request a container converts with (`run --request env:CECAI_REQUEST`)",
               "request, backends.docker", "none", "internal"),
            _v(SPLIT_SIZE, "the size from which publish splits a GGUF file (the tests make it small)", "gha",
               "`2000000000`", "internal"),
            _v(THREADS, "the threads a worker was granted, set by the parent for the child (the `--threads` "
               "option's own variable too)", "threads, request", "the option's", "internal"),
            # -- build -------------------------------------------------------------------------------------------
            _v("CECAI_BASE_IMAGE", "the build and ship base image of scripts/build-image.sh", "scripts/build-image.sh",
               "the pair's bases (pairs.py)", "build"),
            _v("CECAI_CA_FILE", "the CA bundle passed to image builds as the `ca` secret", "scripts/build-image.sh",
               "`/etc/ssl/certs/ca-certificates.crt`", "build"),
            _v("CECAI_CHECK_ARM_DIR", "the work folder of `nox -s check-arm`", "noxfile_images.py",
               "`.nox/check-arm-work`", "build"),
            _v("CECAI_CONTAINERS_CONF", "the containers.conf scripts/dev-clean.sh reads", "scripts/dev-clean.sh",
               "`/etc/containers/containers.conf`", "build"),
            _v("CECAI_CPU_BASE_IMAGE", "the CPU pair's base image for scripts/build-image.sh", "scripts/build-image.sh",
               "the pair's bases (pairs.py)", "build"),
            _v("CECAI_CROSS_BASE_IMAGE", "the base image of the cross-compiling stage", "scripts/build-image.sh",
               "`python:3.11-slim-bookworm`", "build"),
            _v("CECAI_HOME", "where an image installs the converter's venv", "images/install.sh, images/Dockerfile",
               "`/opt/cecai`", "build"),
            _v("CECAI_IMAGE_ENGINE", "`podman` or `docker`: what scripts/build-image.sh builds with",
               "scripts/build-image.sh", "podman when installed, else docker buildx", "build"),
            _v("CECAI_IMAGE_WHEELS", "the wheels build context scripts/build-image.sh assembles",
               "scripts/build-image.sh", "`~/.cache/cecai-converter/image-wheels/<arch>`", "build"),
            _v("CECAI_LLAMA_WHEEL_DIR", "a folder of prebuilt llama-cpp-python wheels for image builds",
               "scripts/build-image.sh", "none", "build"),
            _v("CECAI_PODMAN_LOG", "the log of the podman service scripts/start-podman.sh starts",
               "scripts/start-podman.sh", "`/tmp/podman.log`", "build"),
            _v("CECAI_PODMAN_SOCKET", "the socket of that podman service",
               "scripts/start-podman.sh, scripts/dev-clean.sh", "`/tmp/podman.sock`", "build"),
            _v("CECAI_PRECISIONS", "the precisions `nox -s check-arm` converts", "noxfile_images.py", "`Q8_0 Q4_K_M`",
               "build"),
            _v("CECAI_SKIP_ENGINE", "`1`: ./dev installs no container engine", "./dev", "0", "build"),
            _v("CECAI_TORCH_INDEX_URL", "the index torch's CPU build is installed from", "./dev, "
               "scripts/lib/dev_install.py", "the PyTorch CPU index", "build"),
            _v("CECAI_TORCH_VERSION", "the torch an image installs", "scripts/build-image.sh, noxfile_images.py",
               "pyproject.toml's pin", "build"),
            _v("CECAI_VENV", "the venv ./dev installs into", "./dev, scripts/dev-clean.sh", "`.venv`", "build"),
            # -- test --------------------------------------------------------------------------------------------
            _v("CECAI_ACT_ARTIFACTS", "the folder the act tests' artifact stand-ins store artifacts in (one per act "
               "run)", "tests/act/*-artifact", "set by the act harness", "test"),
            _v("CECAI_ACT_FULL_INSTALL", "`1`: the act tests install the converter as the actions do",
               "tests/act_harness.py", "off", "test"),
            _v("CECAI_ACT_WORKFLOW_SOURCE", "the repository the act tests' checkout stand-in lays out",
               "tests/act/checkout", "set by the act harness", "test"),
            _v("CECAI_FUZZ_EXAMPLES", "how many examples the fuzz tests try", "tests/test_fuzz.py, noxfile.py",
               "the test's own (nox -s fuzz: 5000)", "test"),
            _v("CECAI_REQUIRE", "the parts a test may need (a comma list of tests/conftest.py's PARTS: llama, torch, "
               "matplotlib, signing, act, shellcheck, cmake, engine, gpu; or `all`: every part but gpu) whose absence "
               "fails their tests instead of skipping them (./dev test sets it; scripts/gpu-check.sh adds gpu)",
               "tests/conftest.py, ./dev, scripts/gpu-check.sh", "none: a missing part skips its tests", "test"),
            _v("CECAI_REQUIRE_ENGINE", "`1`: the older spelling of CECAI_REQUIRE=engine", "tests/conftest.py", "off",
               "test"),
            _v("CECAI_SOURCE", "what a reusable-workflow test installs (`pip install \"$CECAI_SOURCE[sign]\"`)",
               "tests/test_reusable_workflow.py", "none", "test"),
            _v("CECAI_TEST_CONVERTER_GATE", "a file a test's stand-in converter waits for", "tests/test_processes.py",
               "none", "test"),
            _v("CECAI_TEST_CONVERTER_PIDFILE", "where a test's stand-in converter writes its process id",
               "tests/test_processes.py", "none", "test"),
            _v("CECAI_TEST_REAL_CONVERTER", "the real converter a test's stand-in hands over to",
               "tests/test_processes.py", "none", "test"),
        ]
    )
)  # fmt: skip


def variable(name: str) -> Variable:
    """The table's row for ``name``.

    Raises:
        KeyError: ``name`` is not in :data:`VARIABLES` (add its row: every variable is documented).
    """
    try:
        return VARIABLES[name]
    except KeyError:
        raise KeyError(f"{name} is not in cecai_converter.environment.VARIABLES: add its row") from None


def text(name: str, environ: Mapping[str, str] | None = None, default: str | None = None) -> str | None:
    """The value of the variable ``name`` in ``environ`` (default ``os.environ``); ``default`` when it is unset (an
    empty value is returned as it is).

    Raises:
        KeyError: ``name`` is not in the table.
    """
    variable(name)
    return (os.environ if environ is None else environ).get(name, default)


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the variable ``name`` is set to a non-empty value (the on/off switches: ``CECAI_DEBUG=1``).

    Raises:
        KeyError: ``name`` is not in the table.
    """
    return bool(text(name, environ))
