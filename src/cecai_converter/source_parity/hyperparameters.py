"""The hyperparameters compared: config.json's rope frequency base, norm epsilon, layer, width and head counts
against the GGUF's metadata, where both state them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from .source_folder import text_config

#: config.json key(s) → GGUF key suffix (after ``<arch>.``) and what it is, for the hyperparameter check.
_HYPERPARAMETERS: Final = (
    (("rope_theta",), "rope.freq_base", "rope frequency base"),
    (("rms_norm_eps",), "attention.layer_norm_rms_epsilon", "RMS norm epsilon"),
    (("layer_norm_eps", "layer_norm_epsilon"), "attention.layer_norm_epsilon", "norm epsilon"),
    (("num_hidden_layers", "n_layer"), "block_count", "layer count"),
    (("hidden_size", "n_embd"), "embedding_length", "hidden size"),
    (("num_attention_heads", "n_head"), "attention.head_count", "attention heads"),
    (("num_key_value_heads",), "attention.head_count_kv", "key/value heads"),
)


def compare_hyperparameters(config: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """config.json against the GGUF's metadata, for the values both state."""
    text = text_config(config)
    arch = str(metadata.get("general.architecture", ""))
    rope = text.get("rope_parameters") if isinstance(text.get("rope_parameters"), Mapping) else {}
    compared: list[str] = []
    differing: list[dict[str, Any]] = []
    for keys, suffix, name in _HYPERPARAMETERS:
        key = next((k for k in keys if k in text), None)
        source_value = text.get(key) if key else None
        if source_value is None and "rope_theta" in keys and isinstance(rope, Mapping):
            key, source_value = "rope_parameters.rope_theta", rope.get("rope_theta")
        gguf_key = f"{arch}.{suffix}"
        gguf_value = metadata.get(gguf_key)
        numbers = (source_value, gguf_value)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            continue
        compared.append(name)
        a, b = float(source_value), float(gguf_value)  # type: ignore[arg-type]
        # The GGUF stores floats as float32: the same value read back differs in the 8th digit at most.
        if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12):
            differing.append({"name": name, "source_key": key, "gguf_key": gguf_key, "source": source_value,
                              "gguf": gguf_value})  # fmt: skip
    return {"compared": compared, "differing": differing}
