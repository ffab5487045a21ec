"""``cecai-convert plan BATCH``: a batch file as the release flow's two job matrices, *make* and *check*.

The files of a model are made once and checked on every pair's runtime:

* **make**: one entry per model, on the builder runners (``builder-labels``, default the CPU pair's labels). The job
  converts, quantizes, verifies and measures fidelity once, and leaves the files, ``manifest.json`` and
  ``reference.json`` (what its runtime predicts for each file) as an artifact.
* **check**: one entry per (model, pair), on runners that carry the pair's labels. The job takes the same bytes and
  runs ``cecai-convert check`` on the pair's runtime: in the pair's image (``backend: docker``) or a runtime
  installed on the runner (``backend: local``).

Where each model's fidelity is measured (the batch's ``fidelity-on``, see :func:`fidelity_plan`): ``builder``, by
the make job; or ``check``, by exactly one of its check jobs, on that pair's runtime (the first GPU pair's, where the
same bytes are evaluated many times faster), against the base the make job then ships. ``auto`` is ``check`` when one
of the model's planned pairs offloads to a GPU, else ``builder``. Only one runtime measures a file, so the published
manifest names one ``measured_by`` pair and device.

GitHub runs at most 256 jobs from one matrix: the limit applies to each. The default output is three lines for
``$GITHUB_OUTPUT`` (``make=…``, ``check=…``, and ``matrix=…``, the check matrix under its old name); ``--format
json`` prints ``{"make": {"include": [...]}, "check": {"include": [...]}}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from .batch import Batch, load_batch
from .errors import ConfigError
from .output import Output
from .pairs import PAIRS, PairInfo, parse_pair

__all__ = [
    "MAX_MATRIX_JOBS",
    "build_matrix",
    "build_plan",
    "fidelity_plan",
    "matrix_json",
    "matrix_line",
    "output_lines",
    "register",
]

#: GitHub runs at most 256 jobs from one matrix.
MAX_MATRIX_JOBS: Final = 256


def fidelity_plan(fidelity_on: str, pairs: Sequence[PairInfo]) -> tuple[str, PairInfo | None]:
    """Where a model's fidelity is measured, given its ``fidelity-on`` (builder|check|auto) and its planned pairs.

    Returns:
        ``("builder", None)``: the make job measures it; or ``("check", pair)``: only ``pair``'s check job does,
        the first pair that offloads to a GPU (:attr:`PairInfo.gpu`), else the first pair. ``auto`` is ``check``
        when one of ``pairs`` offloads to a GPU, else ``builder``.
    """
    gpu = next((p for p in pairs if p.gpu), None)
    if fidelity_on == "builder" or (fidelity_on == "auto" and gpu is None) or not pairs:
        return "builder", None
    return "check", gpu or pairs[0]


def build_plan(batch: Batch, pairs: list[str] | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The make and check matrices for ``batch``: ``{"make": {"include": [...]}, "check": {"include": [...]}}``.

    A make entry holds ``id`` (the model name: artifact ``make-<id>``), ``name``, ``source`` (hub|local),
    ``model``, ``revision`` (``""`` when not given), ``precisions`` (space-separated), ``pairs`` (space-separated
    pair names it is checked on), ``runner_labels`` (the builder labels) and ``fidelity_on`` (builder|check: the
    convert action's ``fidelity-on``).

    A check entry holds ``id`` (``<name>-<slug>``), ``make_id``, ``name``, ``source``, ``model``, ``revision``,
    ``pair``, ``slug``, ``precisions``, ``runner_labels`` (the pair's), ``backend`` (docker|local), ``image``
    (``""``: the pair's default tag), ``max_kld`` and ``min_top1`` (``""``: the check command's defaults) and
    ``fidelity`` (the check action's input: ``"true"`` for the one check job of a ``fidelity_on: check`` model that
    measures its files, see :func:`fidelity_plan`; ``"false"`` for every other). The plan never says ``"auto"``: it
    knows every pair, so it names the one that measures instead of letting each GPU check measure the same files.

    Args:
        batch: the validated batch file.
        pairs: keep only these pairs (names or slugs); ``None`` keeps all. A model with no pair left is not made.

    Raises:
        ConfigError: the plan is empty, or a matrix has more than :data:`MAX_MATRIX_JOBS` entries.
    """
    only = {parse_pair(p).name for p in pairs} if pairs else None
    make: list[dict[str, Any]] = []
    check: list[dict[str, Any]] = []
    for model in batch.models:
        chosen = [p for p in model.pairs if only is None or p.name in only]
        if not chosen:
            continue
        fidelity_on, measurer = fidelity_plan(model.fidelity_on, chosen)
        common = {
            "name": model.name,
            "source": model.source,
            "model": model.model,
            "revision": model.revision or "",
            "precisions": " ".join(p.name for p in model.precisions),
        }
        make.append(
            {
                "id": model.name,
                **common,
                "pairs": " ".join(p.name for p in chosen),
                "runner_labels": list(batch.builder_labels),
                "fidelity_on": fidelity_on,
            }
        )
        for pair in chosen:
            settings = batch.checks[pair.name]
            check.append(
                {
                    "id": f"{model.name}-{pair.slug}",
                    "make_id": model.name,
                    **common,
                    "pair": pair.name,
                    "slug": pair.slug,
                    "runner_labels": list(batch.runner_labels[pair.name]),
                    "backend": settings.backend,
                    "image": settings.image,
                    "max_kld": "" if batch.max_kld is None else f"{batch.max_kld:g}",
                    "min_top1": "" if batch.min_top1 is None else f"{batch.min_top1:g}",
                    "fidelity": "true" if pair == measurer else "false",
                }
            )
    if not check:
        selected = ", ".join(sorted(only)) if only else "any pair"
        raise ConfigError(
            f"{batch.path}: the plan is empty: no model asks for {selected}",
            hint="check the `pairs:` of the models, or drop --pair",
        )
    for kind, entries in (("make", make), ("check", check)):
        if len(entries) > MAX_MATRIX_JOBS:
            raise ConfigError(
                f"{batch.path}: the plan has {len(entries)} {kind} jobs; a GitHub matrix runs at most "
                f"{MAX_MATRIX_JOBS}",
                hint="split the batch into several files, or plan some pairs per workflow with "
                f"`cecai-convert plan BATCH --pair PAIR` (pairs: {', '.join(PAIRS)})",
            )
    return {"make": {"include": make}, "check": {"include": check}}


def build_matrix(batch: Batch, pairs: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The check matrix alone (one entry per model and pair), as earlier releases' single matrix.

    Raises:
        ConfigError: as :func:`build_plan`.
    """
    return build_plan(batch, pairs)["check"]


def matrix_json(matrix: dict[str, Any]) -> str:
    """A matrix as one line of compact JSON with sorted keys, as ``fromJSON`` takes it from ``$GITHUB_OUTPUT``."""
    return json.dumps(matrix, separators=(",", ":"), sort_keys=True)


def matrix_line(matrix: dict[str, Any]) -> str:
    """``matrix=<json>`` on one line, for ``$GITHUB_OUTPUT``."""
    return "matrix=" + matrix_json(matrix)


def output_lines(plan: dict[str, Any]) -> str:
    """The plan as ``$GITHUB_OUTPUT`` lines: ``make=…``, ``check=…`` and ``matrix=…`` (the check matrix)."""
    return "\n".join(
        [f"make={matrix_json(plan['make'])}", f"check={matrix_json(plan['check'])}", matrix_line(plan["check"])]
    )


def _run(args: argparse.Namespace, out: Output) -> int:
    batch = load_batch(Path(args.batch))
    plan = build_plan(batch, args.pair or None)
    out.result(output_lines(plan), plan)
    out.info(
        f"planned {len(plan['make']['include'])} make and {len(plan['check']['include'])} check job(s) "
        f"for {len(batch.models)} model(s) from {args.batch}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``plan`` command."""
    parser = subparsers.add_parser(
        "plan",
        help="turn a batch file (conversions.yaml) into the release flow's make and check job matrices",
        description="Print the job matrices of a batch file: make (one job per model, on the builder labels) and "
        "check (one job per model and pair, on the pair's labels). Default output: `make=<json>`, `check=<json>` "
        "and `matrix=<json>` (the check matrix) lines for $GITHUB_OUTPUT; with --format json, "
        '{"make": {...}, "check": {...}}.',
    )
    parser.add_argument("batch", metavar="BATCH", help="the batch file, e.g. conversions.yaml")
    parser.add_argument(
        "--pair",
        action="append",
        metavar="PAIR",
        help="plan only this pair (name or slug); repeatable",
    )
    parser.set_defaults(handler=_run)
