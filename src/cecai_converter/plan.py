"""``cecai-convert plan BATCH``: a batch file as a GitHub Actions job matrix.

One matrix entry per (model, pair): the job converts the model once and quantizes every precision for that pair, on
a runner that carries the pair's labels (``runs-on: ${{ matrix.runner_labels }}``). The default output is one line,
``matrix=<json>``, ready for ``>> "$GITHUB_OUTPUT"``; ``--format json`` prints the matrix object itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Final

from .batch import Batch, load_batch
from .errors import ConfigError
from .output import Output
from .pairs import PAIRS, parse_pair

__all__ = ["MAX_MATRIX_JOBS", "build_matrix", "matrix_line", "register"]

#: GitHub runs at most 256 jobs from one matrix.
MAX_MATRIX_JOBS: Final = 256


def build_matrix(batch: Batch, pairs: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The job matrix for ``batch``: ``{"include": [entry, ...]}``.

    Each entry holds ``id`` (unique, usable in artifact names), ``name``, ``source`` (hub|local), ``model``,
    ``revision`` (``""`` when not given), ``pair``, ``slug``, ``precisions`` (space-separated, as the convert
    action takes them) and ``runner_labels`` (a list, for ``runs-on``).

    Args:
        batch: the validated batch file.
        pairs: keep only these pairs (names or slugs); ``None`` keeps all.

    Raises:
        ConfigError: the plan is empty or has more than :data:`MAX_MATRIX_JOBS` entries.
    """
    only = {parse_pair(p).name for p in pairs} if pairs else None
    include: list[dict[str, Any]] = []
    for model in batch.models:
        for pair in model.pairs:
            if only is not None and pair.name not in only:
                continue
            include.append(
                {
                    "id": f"{model.name}-{pair.slug}",
                    "name": model.name,
                    "source": model.source,
                    "model": model.model,
                    "revision": model.revision or "",
                    "pair": pair.name,
                    "slug": pair.slug,
                    "precisions": " ".join(p.name for p in model.precisions),
                    "runner_labels": list(batch.runner_labels[pair.name]),
                }
            )
    if not include:
        selected = ", ".join(sorted(only)) if only else "any pair"
        raise ConfigError(
            f"{batch.path}: the plan is empty: no model asks for {selected}",
            hint="check the `pairs:` of the models, or drop --pair",
        )
    if len(include) > MAX_MATRIX_JOBS:
        raise ConfigError(
            f"{batch.path}: the plan has {len(include)} jobs; a GitHub matrix runs at most {MAX_MATRIX_JOBS}",
            hint="split the batch into several files, or plan one pair per workflow job with "
            f"`cecai-convert plan BATCH --pair PAIR` (pairs: {', '.join(PAIRS)})",
        )
    return {"include": include}


def matrix_line(matrix: dict[str, Any]) -> str:
    """``matrix=<json>`` on one line, for ``$GITHUB_OUTPUT``."""
    return "matrix=" + json.dumps(matrix, separators=(",", ":"), sort_keys=True)


def _run(args: argparse.Namespace, out: Output) -> int:
    batch = load_batch(Path(args.batch))
    matrix = build_matrix(batch, args.pair or None)
    out.result(matrix_line(matrix), matrix)
    models = len(batch.models)
    out.info(f"planned {len(matrix['include'])} job(s) for {models} model(s) from {args.batch}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``plan`` command."""
    parser = subparsers.add_parser(
        "plan",
        help="turn a batch file (conversions.yaml) into a GitHub Actions job matrix",
        description="Print a GitHub Actions job matrix for a batch file: one entry per model and pair, each carrying "
        "the runner labels of its pair. Default output: one line `matrix=<json>` for $GITHUB_OUTPUT; "
        "with --format json, the matrix object.",
    )
    parser.add_argument("batch", metavar="BATCH", help="the batch file, e.g. conversions.yaml")
    parser.add_argument(
        "--pair",
        action="append",
        metavar="PAIR",
        help="plan only this pair (name or slug); repeatable",
    )
    parser.set_defaults(handler=_run)
