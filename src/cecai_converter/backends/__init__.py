"""Where a conversion runs. ``local`` is the pipeline in this process; ``docker`` runs the same CLI inside the pair's
image (see :mod:`cecai_converter.backends.docker`). Backends are imported lazily: the docker SDK is an optional
dependency (``pip install 'cecai-converter[docker]'``).

This module is the one list of backends and the one place that picks the default; the CLI, ``conversions.yaml``
(batch.py), nox and the scripts read it. It imports nothing beyond the standard library, so nox can read it
without installing the package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from .. import environment

__all__ = ["BACKENDS", "BACKEND_ENV", "ENTRY_DEFAULTS", "ENTRY_ENV", "RELEASE_CHECK_BACKEND", "default_backend"]

#: The backend names every ``--backend`` (and ``backend:`` in conversions.yaml, and the actions' input) accepts.
BACKENDS: Final = ("local", "docker")
#: The backend of a release check (conversions.yaml ``check.backend``, the check action) unless it says otherwise:
#: the pair's published image is what users run, so that is what a release is checked on.
RELEASE_CHECK_BACKEND: Final = "docker"
#: The variable that changes the default backend of ``run`` and ``convert``.
BACKEND_ENV: Final = environment.BACKEND


#: Says which entry point called the CLI (``cli`` when unset). The per-pair scripts and nox's convert sessions set it:
#: they are the seed flow's entry points, which converted in the pair's image (IMAGE_NAME), and keep doing so.
ENTRY_ENV: Final = environment.ENTRY
#: The default backend of each entry point, when neither ``--backend`` nor ``CECAI_BACKEND`` names one.
ENTRY_DEFAULTS: Final[Mapping[str, str]] = {"cli": "local", "pair-script": "docker"}


def default_backend(environ: Mapping[str, str] | None = None) -> str:
    """The backend a conversion uses when ``--backend`` is not given: ``CECAI_BACKEND``, else the entry point's
    default (:data:`ENTRY_DEFAULTS`: ``local`` for the CLI, ``docker`` for the per-pair scripts and nox sessions).

    ``local`` needs the converter's ``local`` extra on this machine; ``docker`` only the pair's image. An unknown
    ``CECAI_BACKEND`` is returned as written, so the CLI's ``--backend`` check names it.
    """
    env = os.environ if environ is None else environ
    return env.get(BACKEND_ENV, "").strip() or ENTRY_DEFAULTS.get(env.get(ENTRY_ENV, "").strip(), "local")
