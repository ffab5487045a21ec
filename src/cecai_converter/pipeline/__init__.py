"""The conversion pipeline: convert once, quantize each precision once, verify, deliver to every target.

    resolve source → fingerprint → plan (what is already current) → convert base → [imatrix] → quantize
    → verify → [fidelity] → deliver (install each file atomically) → manifest per target

A *target* is one outputs folder (``outputs/<PAIR>`` for a Converter folder, ``--outdir`` otherwise). GGUF bytes
do not depend on the pair, so several targets share one base and one file per precision; a pair's own work is
its verification. Files already made from the same inputs, in this target or a sibling pair's folder, are reused
instead of remade.

The rooms, in the order a job meets them: :mod:`.job` (Job, Target and the typed results the steps hand on),
:mod:`.run` (run_job: the steps in order), :mod:`.source_step` (the source resolved, and compared with the base),
:mod:`.reuse` (earlier runs' manifests, inputs keys, current files), :mod:`.make` (convert, imatrix, quantize,
read back), :mod:`.projector` (towers beyond the text model), :mod:`.checks` (verify, fidelity, reference.json) and
:mod:`.deliver` (files and manifest per target).
"""

from __future__ import annotations

from .job import Job, Target
from .run import run_job

__all__ = ["Job", "Target", "run_job"]
