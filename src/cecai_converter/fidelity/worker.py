"""The worker: ``python -m cecai_converter.fidelity.worker --job FILE --result FILE`` (processes.run_worker), one role
per run: ``base`` evaluates the base's chunks into the cache, ``candidate`` scores one file on them (and, when
asked, verifies it and takes its reference rows from the same load).

The method follows llama.cpp's ``llama-perplexity --kl-divergence`` (see the package's docstring): the text is
tokenized once, cut into chunks of ``n_ctx`` tokens, and only the second half of each chunk is scored.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..agreement import TOP_K
from ..gguf_header import read_header
from ..processes import WorkerUsage, serve_job
from ..runtime import runtime_name
from ..verify import generate_check
from .budget import Budget, spread_order, stop_reason, tokens_needed
from .cache import _CACHE_VERSION, _cached_chunks
from .logprobs import _ROW_BLOCK, bos_token, generation_speed, log_softmax_rows
from .measurement import _MIN_CHUNK
from .stats import chunk_se, error_bars


def _evaluate(job: Mapping[str, Any]) -> dict[str, Any]:
    return _evaluate_base(job) if job["role"] == "base" else _evaluate_candidate(job)


def _load(job: Mapping[str, Any], n_ctx: int) -> Any:
    import llama_cpp  # the worker alone needs the runtime

    kwargs: dict[str, Any] = {
        "model_path": job["model"],
        "n_ctx": n_ctx,
        "n_batch": n_ctx,
        "n_ubatch": min(n_ctx, 512),
        "logits_all": True,
        "n_gpu_layers": int(job["n_gpu_layers"]),
        "verbose": True,
        "seed": 0,
    }
    if job.get("n_threads"):
        kwargs["n_threads"] = int(job["n_threads"])
        kwargs["n_threads_batch"] = int(job["n_threads"])
    return llama_cpp.Llama(**kwargs)


def _chunks(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """The text's chunks (llama-perplexity's boundaries), in the order they are read (:func:`spread_order`)."""
    out = []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        chunk = list(tokens[start : start + n_ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return [out[i] for i in spread_order(len(out))]


def _eval_chunk(llm: Any, chunk: list[int]) -> tuple[Any, float]:
    """Evaluate one chunk; return the log-probs of the scored rows (those predicting tokens n_ctx/2+1 … end)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(chunk)
    elapsed = time.perf_counter() - start
    first = len(chunk) // 2
    logits = llm.scores[first : len(chunk) - 1]
    return log_softmax_rows(logits), elapsed


def _save(path: Path, array: Any) -> None:
    """``np.save`` through a temporary and a rename: a reader (another run on the same cache) never sees half."""
    import numpy as np

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _evaluate_base(job: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate the base's chunks that are not on disk yet, up to ``want_tokens`` scored positions (null: all)."""
    import numpy as np

    work = Path(job["work"])
    meta, ready = _cached_chunks(work)
    if meta is None:
        try:
            text = Path(job["text"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise WorkerUsage(f"cannot read the evaluation text {job['text']}: {exc}") from None
        if job.get("max_tokens"):
            # Tokenize only what can be scored: a token is rarely 64 characters (a text of long runs gives fewer).
            text = text[: 64 * int(job["max_tokens"])]
        # One load in the common case: the context length comes from the header. (A vocabulary-only load followed
        # by a full one in this process ended in SIGSEGV during the second load on a CUDA build; the cause was not
        # isolated, and one load is faster anyway.)
        header = read_header(Path(job["model"]))
        arch = header.metadata.get("general.architecture", "")
        n_ctx_train = int(header.metadata.get(f"{arch}.context_length", 0) or 0)
        n_ctx = min(int(job["n_ctx"]), n_ctx_train) if n_ctx_train > 0 else int(job["n_ctx"])
        llm = _load(job, n_ctx)
        # BOS as llama-perplexity's common_tokenize(ctx, text, add_special=true): the same chunk boundaries
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if job.get("max_tokens"):
            tokens = tokens[: int(job["max_tokens"])]
        if len(tokens) < n_ctx:
            if len(tokens) < 2 * _MIN_CHUNK:
                raise WorkerUsage(
                    f"the evaluation text has only {len(tokens)} tokens; at least {2 * _MIN_CHUNK} are needed"
                )
            n_ctx = len(tokens)  # a short text: one chunk of all of it
            llm.close()
            llm = _load(job, n_ctx)
        bos = bos_token(llm)
        chunks = _chunks(tokens, n_ctx, bos)
        _save(work / "tokens.npy", np.asarray(tokens, dtype=np.int32))
        meta = {"version": _CACHE_VERSION, "n_ctx": n_ctx, "n_vocab": int(llm.n_vocab()), "n_chunks": len(chunks)}
        tmp = work / f".meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, work / "meta.json")
        ready = 0
    else:
        n_ctx = int(meta["n_ctx"])
        llm = _load(job, n_ctx)
        bos = bos_token(llm)
        chunks = _chunks(np.load(work / "tokens.npy").tolist(), n_ctx, bos)
    per_chunk = n_ctx - n_ctx // 2 - 1
    want = job.get("want_tokens")
    fewest = int(job.get("min_chunks") or 0)
    need = len(chunks) if want is None else min(len(chunks), max(-(-int(want) // per_chunk), fewest))
    evaluated = 0
    for i in range(ready, need):
        logp, _ = _eval_chunk(llm, chunks[i])
        targets = np.asarray(chunks[i][n_ctx // 2 + 1 :], dtype=np.int64)
        _save(work / f"base-{i}.npy", logp)
        # n_tokens floats: the base's losses, for the perplexity ratio and its error
        _save(work / f"base-nll-{i}.npy", -logp[np.arange(len(targets)), targets].astype(np.float64))
        evaluated += len(targets)
    return {"n_ctx": n_ctx, "n_chunks": len(chunks), "evaluated_tokens": evaluated}


def _reference_rows(llm: Any, chunk: list[int], n_positions: int) -> dict[str, Any]:
    """agreement.py's reference rows (top-k ids and log-probabilities) of a chunk's first positions, from the
    evaluation that just ran on it (the same positions a check on another runtime evaluates)."""
    import numpy as np

    logp = log_softmax_rows(llm.scores[:n_positions])
    k = min(TOP_K, logp.shape[1])
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    lps = np.take_along_axis(logp, ids, axis=1)
    return {
        "tokens": [int(t) for t in chunk[:n_positions]],
        "ids": ids.astype(int).tolist(),
        "logprobs": [[round(float(v), 6) for v in row] for row in lps],
    }


def _evaluate_candidate(job: Mapping[str, Any]) -> dict[str, Any]:
    """Score the candidate on the base's chunks on disk, going on from where an earlier round of it stopped.

    Replies ``{"status": "more"}`` (its per-position values kept in ``state``) when the base's chunks ran out
    before the budget was met and the text has more; else the measurement.
    """
    import numpy as np

    work, state = Path(job["work"]), Path(job["state"])
    n_ctx = int(job["n_ctx"])
    tokens = np.load(work / "tokens.npy").tolist()
    llm = _load(job, n_ctx)
    if int(llm.n_vocab()) != int(job["n_vocab"]):
        raise WorkerUsage(
            f"the vocabulary differs from the base's ({llm.n_vocab()} vs {job['n_vocab']} tokens): "
            "not a quantization of the same model"
        )
    bos = bos_token(llm)
    chunks = _chunks(tokens, n_ctx, bos)
    per_chunk = n_ctx - n_ctx // 2 - 1
    budget = Budget(**job["budget"]) if job.get("budget") else None
    # Per-position values (n_tokens floats each), for the percentiles, the standard errors and the stopping rule.
    kld, nll, same, eval_s, start = np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool), 0.0, 0
    if (state / "kld.npy").is_file():
        kld, nll, same = (np.load(state / f"{name}.npy") for name in ("kld", "nll", "same"))
        progress = json.loads((state / "progress.json").read_text(encoding="utf-8"))
        start, eval_s = int(progress["next"]), float(progress["eval_s"])
    reply: dict[str, Any] = {}
    if job.get("verify") and start == 0:  # the load that measures the file verifies it too (verify.py's check)
        reply["verification"] = generate_check(llm, int(job["n_gpu_layers"]))
    stopped: str | None = None
    done = start
    for i in range(start, int(job["chunks_ready"])):
        logq, elapsed = _eval_chunk(llm, chunks[i])
        if i == 0 and int(job.get("reference_positions") or 0) > 0:
            reply["reference"] = _reference_rows(llm, chunks[0], int(job["reference_positions"]))
        eval_s += elapsed
        logp = np.load(work / f"base-{i}.npy")
        targets = np.asarray(chunks[i][n_ctx // 2 + 1 :], dtype=np.int64)
        parts = []
        for r in range(0, logp.shape[0], _ROW_BLOCK):
            p_block = logp[r : r + _ROW_BLOCK].astype(np.float64)
            q_block = logq[r : r + _ROW_BLOCK].astype(np.float64)
            parts.append((np.exp(p_block) * (p_block - q_block)).sum(axis=1))
        kld = np.concatenate([kld, *parts])
        nll = np.concatenate([nll, -logq[np.arange(len(targets)), targets].astype(np.float64)])
        same = np.concatenate([same, logp.argmax(axis=1) == logq.argmax(axis=1)])
        done = i + 1
        if budget is not None:
            stopped = stop_reason(kld, same, budget, per_chunk=per_chunk)
            if stopped is not None:
                break
    if stopped is None:
        if done < int(job["n_chunks"]):
            state.mkdir(parents=True, exist_ok=True)
            for name, values in (("kld", kld), ("nll", nll), ("same", same)):
                np.save(state / f"{name}.npy", values)
            (state / "progress.json").write_text(json.dumps({"next": done, "eval_s": eval_s}), encoding="utf-8")
            return {
                **reply,
                "status": "more",
                "need_tokens": tokens_needed(kld, same, budget, per_chunk=per_chunk) if budget else None,
            }
        stopped = "all" if budget is None else "text_end"
    kld_sum, nll_sum = float(kld.sum()), float(nll.sum())
    if not math.isfinite(kld_sum) or not math.isfinite(nll_sum):
        raise RuntimeError("the model produced non-finite logits (NaN or inf): the quantized weights are broken")
    nll_base = np.concatenate([np.load(work / f"base-nll-{i}.npy") for i in range(done)])
    top1_same = int(same.sum())
    gen_tokens = tokens[1:] if bos is not None and tokens and tokens[0] == bos else tokens  # no double BOS
    return {
        **reply,
        "status": "done",
        "stopped": stopped,
        "kld_sum": kld_sum,
        "nll_sum": nll_sum,
        "nll_base_sum": float(nll_base.sum()),
        "top1_same": top1_same,
        "n_tokens": int(kld.size),
        "error_bars": error_bars(kld, nll, nll_base, top1_same),
        "chunks": done,
        "kld_mean_se_chunks": chunk_se(kld, per_chunk),
        "top1_agreement_se_chunks": chunk_se(same, per_chunk),
        "prompt_tps": n_ctx * done / eval_s if eval_s > 0 else math.inf,
        "gen_tps": generation_speed(llm, gen_tokens, bos),
        "device": runtime_name(int(job["n_gpu_layers"])),
    }


def _main(argv: list[str] | None = None) -> int:
    return serve_job(_evaluate, argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(_main())
