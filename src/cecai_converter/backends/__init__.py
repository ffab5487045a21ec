"""Where a conversion runs. ``local`` is the pipeline in this process; ``docker`` runs the same CLI inside the pair's
image (see :mod:`cecai_converter.backends.docker`). Backends are imported lazily: the docker SDK is an optional
dependency (``pip install 'cecai-converter[docker]'``)."""

from __future__ import annotations

__all__ = ["BACKENDS"]

#: The backend names ``cecai-convert run --backend`` accepts.
BACKENDS = ("local", "docker")
