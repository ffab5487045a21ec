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
so this package imports only the standard library and stdlib-only modules of the package at import time; the
engine is spoken to over its HTTP API directly (the same ``DOCKER_HOST`` the docker backend uses), not through the
docker SDK, which is not installed yet at that point.

Disk rule (:func:`disk_needed`): a builder needs ``4 × model size + 3 GB`` free where it works (the source
download, the base GGUF, the quantized files and the one being staged beside its final name; 3 GB for the venv,
the llama-cpp-python build and llama.cpp's tools); a check runner ``2 × model size + 1 GB`` (the builder's files as
downloaded, their unpacked copy; the venv). The engine's image storage is its own and is not counted.

The rooms: :mod:`.probes` (the runner itself: Python, compilers, cmake, GPU, disk), :mod:`.engine` (the container
engine, the image, the NVIDIA runtime), :mod:`.diagnosis` (which checks, in order: :func:`diagnose`), :mod:`.render`
(the table, GitHub's workflow commands, docs/runners.md's table) and :mod:`.command` (the CLI command and
:func:`main`). This file exports the entry points the CLI, the tests and docs/runners.md name.
"""

from __future__ import annotations

from .command import add_arguments, main, register
from .diagnosis import ROLES, Report, checks_for, diagnose
from .probes import BUILDER_DISK, CHECK_DISK, MIN_CMAKE, MIN_PYTHON, Finding, disk_needed, parse_size
from .render import RUNNERS_BEGIN, RUNNERS_END, github_lines, human_table, runners_table

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
