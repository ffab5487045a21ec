"""A GGUF file's tokenizer through llama.cpp: the vocabulary alone, without weights and without a context.

Counting a calibration text's tokens this way takes milliseconds even for large models, and gives exactly the
tokens llama.cpp's own tools see. :func:`count_tokens` does it in a worker process, as every other use of llama.cpp
here: a llama.cpp crash (or heap damage: on a CUDA build a full load that followed a vocabulary-only load in one
process ended in SIGSEGV) never takes the pipeline's own process with it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from .errors import WorkerFailed
from .output import get_logger
from .processes import WorkerUsage, run_worker, serve_job

__all__ = ["COUNT_TIMEOUT_S", "count_tokens", "tokenize"]

_log = get_logger("llama_vocab")

#: A vocabulary-only load takes well under a second even for large models; past this the worker is stuck.
COUNT_TIMEOUT_S: Final = 300.0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # llama-cpp-python routes llama.cpp's log through this logger; loading chatter is not ours to show.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def tokenize(model: Path, text: bytes, *, add_special: bool) -> list[int]:
    """Tokenize ``text`` with the tokenizer stored in the GGUF file ``model``.

    Args:
        model: a GGUF model file.
        text: UTF-8 bytes.
        add_special: add the model's BOS/EOS as its metadata asks (what llama.cpp's tools do with a prompt).

    Raises:
        ImportError: llama-cpp-python is not installed.
        RuntimeError: llama.cpp could not load the file's vocabulary.
    """
    import llama_cpp

    with _quiet():
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        handle = llama_cpp.llama_model_load_from_file(str(Path(model).resolve()).encode(), params)
        if not handle:
            raise RuntimeError(f"llama.cpp could not load the vocabulary of {model}")
        try:
            return _tokenize(llama_cpp, llama_cpp.llama_model_get_vocab(handle), text, add_special)
        finally:
            llama_cpp.llama_model_free(handle)


def _tokenize(llama_cpp: Any, vocab: Any, text: bytes, add_special: bool) -> list[int]:
    capacity = len(text) + 2  # a token covers at least one byte, plus BOS and EOS
    buf = (llama_cpp.llama_token * capacity)()
    n = int(llama_cpp.llama_tokenize(vocab, text, len(text), buf, capacity, add_special, False))
    if n < 0:  # more tokens than bytes (a byte-fallback tokenizer on odd input): -n is the count needed
        capacity = -n
        buf = (llama_cpp.llama_token * capacity)()
        n = int(llama_cpp.llama_tokenize(vocab, text, len(text), buf, capacity, add_special, False))
    if n < 0:
        raise RuntimeError("llama.cpp could not tokenize the text")
    return list(buf[:n])


def count_tokens(
    model: Path, text: Path, *, add_special: bool = True, timeout: float | None = COUNT_TIMEOUT_S
) -> int | None:
    """How many tokens ``text`` (a UTF-8 file) is for ``model``'s tokenizer, counted in a worker process.

    ``None`` when the worker cannot say (llama-cpp-python missing, an unreadable vocabulary, a crash, the time
    limit): the caller then goes on without the count.
    """
    job = {"model": str(model), "text": str(text), "add_special": add_special}
    try:
        result = run_worker("cecai_converter.llama_vocab", job, timeout=timeout, name="token count")
    except WorkerFailed as exc:
        _log.debug("no token count for %s: %s", text, exc.message)
        return None
    n_tokens = result.data.get("n_tokens")
    return n_tokens if isinstance(n_tokens, int) and not isinstance(n_tokens, bool) else None


def _count(job: Mapping[str, Any]) -> dict[str, Any]:
    """The worker's job: the token count of one text."""
    try:
        tokens = tokenize(Path(job["model"]), Path(job["text"]).read_bytes(), add_special=bool(job["add_special"]))
    except (ImportError, OSError, RuntimeError) as exc:
        raise WorkerUsage(f"cannot count tokens: {exc}") from None
    return {"n_tokens": len(tokens)}


if __name__ == "__main__":
    sys.exit(serve_job(_count))
