"""Options: how to convert, typed; the request's (:meth:`cecai_converter.request.Request.to_options` makes them)
and what the pipeline reads (``Job.options``).

A room of its own below both: the request resolves the options table into these, the pipeline takes them as given,
and neither imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Options"]


@dataclass(frozen=True)
class Options:
    """How to convert; every field has a CLI flag and most have a YAML key."""

    force: bool = False
    keep_base: bool = False
    threads: int | None = None
    allow_pickle: bool = False
    imatrix: Path | None = None
    #: compute an importance matrix with llama-imatrix (on calibration_text, else the shipped text)
    compute_imatrix: bool = False
    calibration_text: Path | None = None
    fidelity: bool = False
    #: where fidelity is measured: ``builder`` (here) or ``check`` (the check jobs; the base goes to the outputs)
    fidelity_on: str = "builder"
    eval_text: Path | None = None
    #: the error bar fidelity stops at (fidelity.Budget.target), and ``auto`` (stop there) or ``all`` (whole text)
    fidelity_target: float = 0.1
    fidelity_tokens: str = "auto"
    thresholds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    verify: bool = True
    n_gpu_layers: int = 0
    #: write reference.json (what this runtime predicts for each file) so other runtimes can be checked against it
    reference: bool = False
    #: per-tensor type overrides for the quantizer, ``PATTERN=TYPE`` (TENSOR_TYPES; quant_types.parse_rule)
    tensor_types: tuple[str, ...] = ()
    #: publish the text model alone when the model has towers that cannot be exported (recorded; default: refuse)
    text_only: bool = False
    #: compare the base with the source model (source_parity.py; the table's default is on, as for fidelity)
    source_check: bool = False
    #: let the source check run the repository's own model code (auto_map), recorded
    trust_remote_code: bool = False
