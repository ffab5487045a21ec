"""``python -m cecai_converter`` is the ``cecai-convert`` command."""

from .cli import main

raise SystemExit(main())
