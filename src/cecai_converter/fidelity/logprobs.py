"""What the workers that run llama-cpp-python share (fidelity's, agreement.py's and the source check's GGUF side):
log-probabilities from a model's scores, the BOS token a prompt starts with, the generation speed."""

from __future__ import annotations

import time
from typing import Any, Final

# numpy is imported inside the functions (slow to import): the CLI reads this package's limits and starts without it.

# Greedy decoding used for the generation speed.
_GEN_PROMPT: Final = 16
_GEN_TOKENS: Final = 48
# Rows of a chunk turned into log-probabilities at once (bounds the float64 scratch memory).
_ROW_BLOCK: Final = 64


def log_softmax_rows(logits: Any) -> Any:
    """Row-wise log-softmax in float64 blocks, returned as float32 (n_rows × n_vocab)."""
    import numpy as np

    out = np.empty(logits.shape, dtype=np.float32)
    for i in range(0, logits.shape[0], _ROW_BLOCK):
        block = logits[i : i + _ROW_BLOCK].astype(np.float64)
        block -= block.max(axis=1, keepdims=True)
        block -= np.log(np.exp(block).sum(axis=1, keepdims=True))
        out[i : i + _ROW_BLOCK] = block
    return out


def generation_speed(llm: Any, tokens: list[int], bos: int | None) -> float:
    """Tokens per second of greedy one-token decoding after a short prompt from ``tokens``."""
    import numpy as np

    prompt = ([bos] if bos is not None else []) + list(tokens[:_GEN_PROMPT])
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(_GEN_TOKENS):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    return _GEN_TOKENS / (time.perf_counter() - start)


def bos_token(llm: Any) -> int | None:
    """The BOS token a prompt starts with for this model's vocabulary, or None when it adds none."""
    model = llm._model  # llama-cpp-python's internal model wrapper: the one place add_bos is exposed
    return int(model.token_bos()) if model.add_bos_token() and model.token_bos() >= 0 else None
