"""What each quantization cost: KL-divergence, perplexity and top-1 agreement against the base GGUF.

The method follows llama.cpp's ``llama-perplexity --kl-divergence``: the evaluation text is tokenized once (with
BOS when the vocabulary adds one, as the tool does), cut into chunks of ``n_ctx`` tokens (the first token of each
chunk replaced by BOS when the vocabulary adds one), each chunk is evaluated with logits for every position, and
only the second half of each chunk is scored, so every scored token has at least ``n_ctx / 2`` tokens of context.
Over the scored positions:

* ``kld_mean``: mean of the per-token KL(base ‖ candidate) = Σ p_base · (log p_base − log p_candidate), in nats;
  ``kld_mean_se`` its standard error; ``kld_median``, ``kld_p99``, ``kld_p99_9``, ``kld_max``: the median, 99th and
  99.9th percentiles and maximum of the per-token values (the tail is where a quantization breaks);
* ``ppl`` / ``ppl_base``: exp of the mean negative log-likelihood of the actual next token;
* ``ppl_delta_pct``: ``(ppl / ppl_base − 1) · 100``; ``ppl_ratio``: ``ppl / ppl_base`` and ``ppl_ratio_se`` its
  standard error, from the covariance of the two per-token log-likelihood series;
* ``top1_agreement``: the fraction of positions where both models rank the same token first; ``top1_agreement_se``:
  ``sqrt(p (1 − p) / (n − 1))``;
* ``prompt_tps`` / ``gen_tps``: tokens per second of the chunk evaluation (batched) and of greedy one-token
  decoding, on the machine and device that ran it;
* ``device``: ``cuda`` when layers were offloaded to a GPU build, else ``cpu``; ``n_tokens``: scored positions.

The rooms: :mod:`.measurement` (the parent side: :func:`measure`, :func:`measure_run`), :mod:`.worker` (the
llama.cpp side, in a subprocess), :mod:`.stats` (llama-perplexity's error bars), :mod:`.budget` (how many chunks
are read), :mod:`.cache` (the base's evaluation kept on disk), :mod:`.thresholds` (the limits a file is held to),
:mod:`.logprobs` (what every llama-cpp-python worker shares). This package exports the public names of all of them.
"""

from __future__ import annotations

from ..errors import MeasurementFailed
from .budget import (
    DEFAULT_TARGET,
    KLD_SE_FLOOR,
    MIN_BUDGET_CHUNKS,
    MIN_BUDGET_TOKENS,
    TOKEN_MODES,
    TOP1_SE_TARGET,
    Budget,
    check_target,
    spread_order,
    stop_reason,
    tokens_needed,
)
from .cache import base_cache_key, default_cache_root
from .logprobs import bos_token, generation_speed, log_softmax_rows
from .measurement import DEFAULT_EVAL_TEXT, RESULT_KEYS, FidelityRun, default_eval_text, measure, measure_run
from .stats import chunk_se, error_bars, mean_and_se
from .thresholds import THRESHOLD_KEYS, THRESHOLD_RANGES, check_thresholds, threshold_value, validate_thresholds

__all__ = [
    "DEFAULT_EVAL_TEXT",
    "DEFAULT_TARGET",
    "KLD_SE_FLOOR",
    "MIN_BUDGET_CHUNKS",
    "MIN_BUDGET_TOKENS",
    "RESULT_KEYS",
    "THRESHOLD_KEYS",
    "THRESHOLD_RANGES",
    "TOKEN_MODES",
    "TOP1_SE_TARGET",
    "Budget",
    "FidelityRun",
    "MeasurementFailed",
    "base_cache_key",
    "bos_token",
    "check_target",
    "check_thresholds",
    "chunk_se",
    "default_cache_root",
    "default_eval_text",
    "error_bars",
    "generation_speed",
    "log_softmax_rows",
    "mean_and_se",
    "measure",
    "measure_run",
    "spread_order",
    "stop_reason",
    "threshold_value",
    "tokens_needed",
    "validate_thresholds",
]
