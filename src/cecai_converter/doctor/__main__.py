"""``python -m cecai_converter.doctor``: the doctor command, runnable before the package's dependencies are installed
(``actions/doctor.sh`` runs it from the action's source with the runner's Python)."""

from __future__ import annotations

import sys

from .command import main

sys.exit(main())
