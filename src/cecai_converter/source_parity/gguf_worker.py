"""The GGUF side's worker (``python -m cecai_converter.source_parity.gguf_worker``, run by
:meth:`~cecai_converter.source_parity.compare.SourceCheck.finish`): llama.cpp tokenizes the same strings, renders the
templates with the runtime's own formatter and evaluates the source's tokens, saving its logits to the work folder.
A separate process: llama.cpp's memory is released when it ends, and a crash (llama.cpp may abort) is a clean error."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..processes import WorkerUsage, serve_job
from .logits import GGUF_LOGITS


def _gguf_worker(job: Mapping[str, Any]) -> dict[str, Any]:
    """llama.cpp's side: tokenize, render the templates, evaluate the tokens (logits written to the work folder)."""
    import llama_cpp
    import numpy as np

    tokens = job.get("tokens")
    kwargs: dict[str, Any] = {"model_path": job["model"], "n_gpu_layers": 0, "verbose": False, "seed": 0}
    if tokens:
        n_ctx = max(len(tokens), 8)
        kwargs.update(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True)
    else:
        kwargs.update(vocab_only=True, n_ctx=8)
    if job.get("threads"):
        kwargs["n_threads"] = kwargs["n_threads_batch"] = int(job["threads"])
    try:
        llm = llama_cpp.Llama(**kwargs)
    except ValueError as exc:
        raise WorkerUsage(f"llama.cpp could not load {job['model']}: {exc}") from None
    model = llm._model  # llama-cpp-python's model wrapper: the vocabulary's BOS/EOS and add_bos live there
    out: dict[str, Any] = {
        "encodings": [llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in job["strings"]],
        "with_special": llm.tokenize(str(job["sample"]).encode("utf-8"), add_bos=True, special=True),
        "sample_plain": llm.tokenize(str(job["sample"]).encode("utf-8"), add_bos=False, special=True),
        "bos_id": _token_or_none(llm.token_bos()),
        "eos_id": _token_or_none(llm.token_eos()),
        "add_bos": bool(model.add_bos_token()),
        "add_eos": bool(model.add_eos_token()),
    }
    if job.get("source_encodings") is not None:
        out["space_prefix_only"] = [
            i
            for i, (mine, theirs) in enumerate(zip(job["source_encodings"], out["encodings"], strict=True))
            if list(mine) != list(theirs) and _space_prefix_only(llm, mine, theirs)
        ]
    bos = model.token_get_text(out["bos_id"]) if out["bos_id"] is not None else ""
    eos = model.token_get_text(out["eos_id"]) if out["eos_id"] is not None else ""
    template = (llm.metadata or {}).get("tokenizer.chat_template")
    out["renders"] = _render_runtime(template, bos, eos, job["conversations"])
    if tokens:
        llm.eval(list(tokens))
        # compared by the parent, once the source side (which may still be running) has written its own
        np.save(Path(job["work"]) / GGUF_LOGITS, np.array(llm.scores[: len(tokens)], dtype=np.float32))
    return out


def _space_prefix_only(llm: Any, source_ids: Sequence[int], gguf_ids: Sequence[int]) -> bool:
    """Whether two different tokenizations differ only by llama.cpp's SentencePiece space prefix.

    llama.cpp's SentencePiece tokenizer puts a space before every piece of text that starts a string or follows a
    special token, even one that starts with a space already (as sentencepiece's own ``add_dummy_prefix`` does);
    transformers' tokenizer does not in those two places. That is the runtime's documented behaviour, not a
    conversion error: the two sequences must then hold the same special tokens, and between them the same text,
    the GGUF's with one more leading ``▁``.
    """
    import llama_cpp

    vocab = llm._model.vocab
    if llama_cpp.llama_vocab_type(vocab) != llama_cpp.LLAMA_VOCAB_TYPE_SPM:
        return False
    n_vocab = int(llm.n_vocab())
    special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    special |= llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN

    def segments(ids: Sequence[int]) -> tuple[list[list[int]], list[int]] | None:
        parts: list[list[int]] = [[]]
        marks: list[int] = []
        for token in ids:
            if not 0 <= int(token) < n_vocab:
                return None
            if llama_cpp.llama_vocab_get_attr(vocab, int(token)) & special:
                marks.append(int(token))
                parts.append([])
            else:
                parts[-1].append(int(token))
        return parts, marks

    mine, theirs = segments(source_ids), segments(gguf_ids)
    if mine is None or theirs is None or mine[1] != theirs[1]:
        return False
    for a, b in zip(mine[0], theirs[0], strict=True):
        text_a = "".join(llm._model.token_get_text(t) for t in a)
        text_b = "".join(llm._model.token_get_text(t) for t in b)
        if a != b and text_b != "\u2581" + text_a:
            return False
    return True


def _token_or_none(token: int) -> int | None:
    return int(token) if token is not None and int(token) >= 0 else None


def _render_runtime(template: object, bos: str, eos: str, conversations: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(template, str):
        return {}
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    renders: dict[str, Any] = {}
    for name, conv in conversations.items():
        if conv["tools"] is not None and "tool" not in template:
            continue
        try:
            formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
            renders[name] = {"text": formatter(messages=conv["messages"], tools=conv["tools"]).prompt}
        except Exception as exc:  # a template that raises is recorded, not a failure of the check
            renders[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return renders


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(serve_job(_gguf_worker))
