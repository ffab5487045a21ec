"""Do two runtimes agree on one GGUF file? A small *reference* from the builder, compared on another runtime.

A file is made once (by the builder) and checked on every pair's runtime. The GGUF bytes are the same everywhere,
but what a runtime computes from them is not guaranteed to be: another CPU architecture, a CUDA kernel or a
miscompiled build can give other next-token distributions from the same weights. So the builder records what its
runtime predicts on a fixed text, and each pair's runtime is compared against that record:

* :func:`make_reference` evaluates the first :data:`N_POSITIONS` tokens of the shipped evaluation text (tokenized
  once, by the builder, so every runtime sees the same token ids) and keeps, per position, the :data:`TOP_K` most
  likely next tokens and their log-probabilities. A few hundred kilobytes at most, whatever the vocabulary size.
* :func:`compare` evaluates the same tokens on this runtime and returns, over the positions, the mean and the
  maximum KL-divergence KL(builder ‖ this runtime) and the top-1 agreement, plus prompt and generation speed, peak
  memory and the layers offloaded.

The KL-divergence is computed on the builder's top-k tokens plus one bucket for the rest of the vocabulary (the
builder's remaining probability mass against this runtime's mass outside those k tokens). Merging tokens can only
lower a KL-divergence, so the figure is a lower bound of the full one; with k = 32 the tail holds little mass on a
trained model, and a broken kernel moves the top tokens themselves. Identical runtimes give exactly 0.

llama.cpp runs in worker processes (one per file, so peak memory is the file's own), like verification and
fidelity: a file that makes llama.cpp abort becomes an error naming it.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeGuard

from .errors import AgreementFailed, BadReference, ConfigError, GGUFHeaderError, WorkerFailed
from .fidelity import bos_token, default_eval_text, generation_speed, log_softmax_rows
from .gguf_header import read_header
from .names import show
from .processes import WorkerUsage, run_worker, serve_job
from .runtime import gpu_offload, runtime_env, runtime_facts
from .untrusted_json import load_bounded_file

__all__ = [
    "N_POSITIONS",
    "REFERENCE_NAME",
    "REFERENCE_SCHEMA",
    "TOP_K",
    "AgreementFailed",
    "BadReference",
    "check_reference_fits",
    "compare",
    "make_reference",
    "read_reference",
]

#: The reference's file name in an outputs folder.
REFERENCE_NAME: Final = "reference.json"
REFERENCE_SCHEMA: Final = 1
#: Positions evaluated: enough to see a systematic difference, small enough to run in seconds on any pair.
N_POSITIONS: Final = 128
#: The fewest tokens the builder writes (a shorter text is refused when the reference is made).
MIN_TOKENS: Final = 8
#: The largest reference read: the builder writes about 70 kB per file (N_POSITIONS × TOP_K ids and values).
MAX_REFERENCE_BYTES: Final = 16 * 1024 * 1024
# llama.cpp's token ids are 32-bit.
_MAX_TOKEN_ID: Final = 2**31
# The builder rounds log-probabilities to 6 decimals: a true 0 may be stored as a few 1e-7 above it.
_LOGPROB_SLACK: Final = 1e-6
_MASS_SLACK: Final = 1e-3
_BAD_HINT: Final = (
    "reference.json is written by `cecai-convert convert` next to manifest.json: use the make job's folder as it "
    "was written, or convert again"
)
#: Tokens kept per position.
TOP_K: Final = 32
_TAIL_FLOOR: Final = 1e-12


def read_reference(path: Path) -> dict[str, Any]:
    """A reference written by :func:`make_reference`, checked before any work (it may come from anywhere).

    Checked: the size and the nesting (the bounded JSON reader), the schema, ``top_k`` (1 to :data:`TOP_K`), the
    tokens (:data:`MIN_TOKENS` to :data:`N_POSITIONS` non-negative ids: what the builder writes), and per file one
    row per token, every row of one length up to ``top_k``, with distinct non-negative ids and finite
    log-probabilities ≤ 0 in decreasing order whose probabilities sum to at most 1. What depends on the GGUF file
    (its vocabulary, its trained context) is checked by :func:`check_reference_fits`.

    Raises:
        ConfigError: missing.
        BadReference: unreadable, too large, or a field out of shape or range (the message names the field).
    """

    try:
        data = load_bounded_file(
            path,
            max_bytes=MAX_REFERENCE_BYTES,
            allow_nan=True,  # read, then refused below naming its field
            error=BadReference,
            hint=_BAD_HINT,
            raise_missing=True,
        )
    except FileNotFoundError:
        raise ConfigError(
            f"no runtime reference at {path}",
            hint="make the files with `cecai-convert convert` (it writes reference.json next to manifest.json), "
            "or `run --reference`",
        ) from None
    _check_reference(data, path)
    reference: dict[str, Any] = data
    return reference


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_reference(data: object, path: Path) -> None:
    """Raise :class:`BadReference` naming the first field of ``data`` out of shape or range."""

    def refuse(field: str, why: str) -> NoReturn:
        raise BadReference(f"{path}: {field}: {why}", hint=_BAD_HINT)

    ok = (
        isinstance(data, dict)
        and _is_int(data.get("schema"))
        and data.get("schema") == REFERENCE_SCHEMA
        and isinstance(data.get("tokens"), list)
        and isinstance(data.get("files"), dict)
    )
    if not ok:
        raise BadReference(
            f"{path}: not a cecai-converter runtime reference (schema {REFERENCE_SCHEMA})", hint=_BAD_HINT
        )
    assert isinstance(data, dict)
    tokens, files = data["tokens"], data["files"]
    for i, token in enumerate(tokens):
        if not (_is_int(token) and 0 <= token < _MAX_TOKEN_ID):
            refuse(f"tokens[{i}]", f"expected a token id (a whole number ≥ 0), got {show(token)}")
    for name, entry in files.items():
        rows = entry.get("ids") if isinstance(entry, dict) else None
        lps = entry.get("logprobs") if isinstance(entry, dict) else None
        if not (isinstance(rows, list) and isinstance(lps, list) and len(rows) == len(lps) == len(tokens)):
            raise BadReference(f"{path}: the entry for {show(name)} does not have one row per token", hint=_BAD_HINT)
    top_k = data.get("top_k")
    if not (_is_int(top_k) and 1 <= top_k <= TOP_K):
        refuse("top_k", f"expected a whole number from 1 to {TOP_K} (what the builder keeps), got {show(top_k)}")
    if files and not MIN_TOKENS <= len(tokens) <= N_POSITIONS:
        refuse("tokens", f"{len(tokens)} tokens; the builder writes {MIN_TOKENS} to {N_POSITIONS}")
    for name, entry in files.items():
        here = f"files[{show(name)}]"
        if "sha256" in entry and not isinstance(entry["sha256"], str):
            refuse(f"{here}.sha256", f"expected a string, got {show(entry['sha256'])}")
        width: int | None = None
        for i, (ids, lps) in enumerate(zip(entry["ids"], entry["logprobs"], strict=True)):
            if not (isinstance(ids, list) and isinstance(lps, list) and len(ids) == len(lps)):
                refuse(f"{here}.ids[{i}]", "expected a list of ids and one log-probability for each")
            if width is None:
                width = len(ids)
                if not 1 <= width <= top_k:
                    refuse(f"{here}.ids[{i}]", f"{width} ids; top_k is {top_k}")
            elif len(ids) != width:
                refuse(f"{here}.ids[{i}]", f"{len(ids)} ids where the rows before have {width}")
            for j, token in enumerate(ids):
                if not (_is_int(token) and 0 <= token < _MAX_TOKEN_ID):
                    refuse(f"{here}.ids[{i}][{j}]", f"expected a token id (a whole number ≥ 0), got {show(token)}")
            if len(set(ids)) != len(ids):
                refuse(f"{here}.ids[{i}]", "a token appears twice")
            mass, previous = 0.0, math.inf
            for j, lp in enumerate(lps):
                number = float(lp) if isinstance(lp, (int, float)) and not isinstance(lp, bool) else math.nan
                if not (math.isfinite(number) and number <= _LOGPROB_SLACK):
                    refuse(f"{here}.logprobs[{i}][{j}]", f"expected a log-probability (finite, ≤ 0), got {show(lp)}")
                if number > previous:
                    refuse(f"{here}.logprobs[{i}][{j}]", "the log-probabilities of a row must not increase")
                previous = number
                mass += math.exp(number)
            if mass > 1 + _MASS_SLACK:
                refuse(f"{here}.logprobs[{i}]", f"the probabilities sum to {mass:.4f}, more than 1")


def check_reference_fits(reference: Mapping[str, Any], name: str, path: Path, *, where: str = REFERENCE_NAME) -> None:
    """Check the reference's entry for ``name`` against the GGUF file at ``path``, before it is evaluated.

    Every id must be a token of the file's vocabulary (the rows as wide as ``top_k`` or the whole vocabulary), and
    the tokens must fit the file's trained context. A file whose header cannot be read is left to the runtime,
    which says what is wrong with it.

    Raises:
        BadReference: naming the field, the file and its limit.
    """
    entry = reference["files"].get(name)
    if entry is None:
        return
    try:
        header = read_header(path)
    except (GGUFHeaderError, OSError):
        return
    arch = header.metadata.get("general.architecture", "")
    trained = header.metadata.get(f"{arch}.context_length")
    tokens = reference["tokens"]
    if _is_int(trained) and 0 < trained < len(tokens):
        raise BadReference(
            f"{where}: tokens: {len(tokens)} tokens, more than {name}'s trained context ({trained})", hint=_BAD_HINT
        )
    n_vocab = _vocabulary_size(header)
    if n_vocab is None:
        return
    _check_vocabulary(tokens, entry["ids"], int(reference["top_k"]), n_vocab, f"{where}: ", name)


def _vocabulary_size(header: Any) -> int | None:
    """The vocabulary of a GGUF file from its header: the token embedding's rows (llama.cpp checks it against the
    tokenizer when it loads the file, so a file that loads has exactly this many tokens)."""
    for tensor in header.tensors:
        if tensor.name == "token_embd.weight" and len(tensor.shape) >= 2 and tensor.shape[1] > 0:
            return int(tensor.shape[1])
    return None


def _check_vocabulary(
    tokens: list[int], rows: list[list[int]], top_k: int, n_vocab: int, prefix: str, name: str
) -> None:
    """Raise :class:`BadReference` (in the parent) when a token or an id is not in a vocabulary of ``n_vocab``."""
    for i, token in enumerate(tokens):
        if token >= n_vocab:
            raise BadReference(
                f"{prefix}tokens[{i}]: token {token} is not in {name}'s vocabulary ({n_vocab} tokens)", hint=_BAD_HINT
            )
    width = min(top_k, n_vocab)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise BadReference(
                f"{prefix}files[{name!r}].ids[{i}]: {len(row)} ids; the builder keeps {width} for this file",
                hint=_BAD_HINT,
            )
        for j, token in enumerate(row):
            if token >= n_vocab:
                raise BadReference(
                    f"{prefix}files[{name!r}].ids[{i}][{j}]: token {token} is not in {name}'s vocabulary "
                    f"({n_vocab} tokens)",
                    hint=_BAD_HINT,
                )


def make_reference(
    files: Mapping[str, Path],
    *,
    n_gpu_layers: int = 0,
    threads: int | None = None,
    text: Path | None = None,
    tokens: list[int] | None = None,
) -> dict[str, Any]:
    """What this runtime predicts for each file on the fixed text (see the module docstring).

    Args:
        files: file name (as published) → path; files of one model (they share the tokenizer).
        n_gpu_layers: layers to offload (the builder's runtime setting).
        threads: CPU threads for llama.cpp.
        text: the text; default the shipped evaluation text.
        tokens: the token ids to evaluate instead of the text's first ones (the positions fidelity's evaluation
            took its rows from, so that rows from both agree: :func:`cecai_converter.fidelity.measure_run`).

    Returns:
        ``{schema, tokens, top_k, runtime, files: {name: {sha256?, ids, logprobs}}}``; the caller adds sha256.
    """
    if not files:
        return {"schema": REFERENCE_SCHEMA, "tokens": [], "top_k": TOP_K, "files": {}}
    first = next(iter(files.values()))
    if tokens is None:
        tokens = _run_worker(
            {"role": "tokenize", "model": str(first), "text": str(text or default_eval_text())},
            n_gpu_layers,
            threads,
            label=first.name,
        )["tokens"]
    result: dict[str, Any] = {
        "schema": REFERENCE_SCHEMA,
        "tokens": tokens,
        "top_k": TOP_K,
        "runtime": runtime_facts(n_gpu_layers),
        "files": {},
    }
    for name, path in files.items():
        out = _run_worker(
            {"role": "reference", "model": str(path), "tokens": tokens}, n_gpu_layers, threads, label=name
        )
        result["files"][name] = {"ids": out["ids"], "logprobs": out["logprobs"]}
    return result


@dataclass(frozen=True)
class Agreement:
    """How this runtime compares with the builder's on one file, and how fast it ran."""

    kld_mean: float
    kld_max: float
    top1_agreement: float
    n_positions: int
    prompt_tps: float
    gen_tps: float
    peak_rss_mib: float
    offloaded_layers: int
    total_layers: int

    def as_dict(self) -> dict[str, Any]:
        """The record's ``agreement`` and speed fields."""
        return {
            "kld_mean": self.kld_mean,
            "kld_max": self.kld_max,
            "top1_agreement": self.top1_agreement,
            "n_positions": self.n_positions,
            "prompt_tps": round(self.prompt_tps, 2),
            "gen_tps": round(self.gen_tps, 2),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "offloaded_layers": self.offloaded_layers,
            "total_layers": self.total_layers,
        }


def compare(
    reference: Mapping[str, Any],
    name: str,
    path: Path,
    *,
    n_gpu_layers: int = 0,
    threads: int | None = None,
) -> Agreement:
    """Evaluate ``path`` on this runtime and compare it with ``reference``'s entry for ``name``.

    ``reference`` comes from :func:`read_reference` (checked for shape and range); it is checked against the file
    here too (:func:`check_reference_fits`), so the worker's work is bounded by what the builder writes:
    at most :data:`N_POSITIONS` tokens and :data:`TOP_K` ids per row.

    Raises:
        ConfigError: the reference has no entry for ``name``.
        BadReference: the file's vocabulary or trained context does not fit the reference.
        AgreementFailed: llama.cpp could not load or evaluate the file.
    """
    entry = reference["files"].get(name)
    if entry is None:
        raise ConfigError(f"the runtime reference has no entry for {name}", hint="make the files again")
    check_reference_fits(reference, name, path)
    out = _run_worker(
        {
            "role": "compare",
            "model": str(path),
            "tokens": reference["tokens"],
            "ids": entry["ids"],
            "logprobs": entry["logprobs"],
            "top_k": reference["top_k"],
        },
        n_gpu_layers,
        threads,
        label=name,
        usage=BadReference,
    )
    return Agreement(**out)


# --- the parent side -------------------------------------------------------------------------------------------


def _run_worker(
    job: dict[str, Any],
    n_gpu_layers: int,
    threads: int | None,
    *,
    label: str,
    usage: type[ConfigError] = ConfigError,
) -> dict[str, Any]:
    try:
        return run_worker(
            "cecai_converter.agreement",
            {**job, "n_gpu_layers": n_gpu_layers, "threads": threads},
            timeout=None,  # a check job has its own limit; one file's evaluation has no natural one
            name=f"agreement {job['role']}",
            env=runtime_env(n_gpu_layers),
        ).data
    except WorkerFailed as exc:
        if exc.kind == "usage":  # the job cannot be done as asked: an input error, not this runtime's failure
            raise usage(f"{label}: {exc.reason}", hint=_BAD_HINT if usage is BadReference else None) from None
        shown = f" ({exc.summary})" if exc.summary else ""
        raise AgreementFailed(
            f"this runtime could not evaluate {label}: {exc.reason}{shown}",
            hint="the file may use a type this llama-cpp-python build cannot run; `cecai-convert verify` shows more",
        ) from None


# --- the worker (a separate process: llama.cpp may abort) ---------------------------------------------------------


def _load(model: str, n_ctx: int, job: Mapping[str, Any], *, logits_all: bool, vocab_only: bool = False) -> Any:
    import llama_cpp

    kwargs: dict[str, Any] = {
        "model_path": model,
        "n_ctx": n_ctx,
        "n_batch": n_ctx,
        "logits_all": logits_all,
        "n_gpu_layers": int(job["n_gpu_layers"]),
        "verbose": False,
        "seed": 0,
        "vocab_only": vocab_only,
    }
    if job.get("threads"):
        kwargs["n_threads"] = kwargs["n_threads_batch"] = int(job["threads"])
    return llama_cpp.Llama(**kwargs)


def _n_ctx(model: str) -> int:
    header = read_header(Path(model))
    arch = header.metadata.get("general.architecture", "")
    trained = int(header.metadata.get(f"{arch}.context_length", 0) or 0)
    return min(N_POSITIONS, trained) if trained > 0 else N_POSITIONS


def _layers(model: str, n_gpu_layers: int) -> tuple[int, int]:
    """(offloaded, total) as llama.cpp counts them: the repeating blocks plus the output layer."""
    header = read_header(Path(model))
    arch = header.metadata.get("general.architecture", "")
    total = int(header.metadata.get(f"{arch}.block_count", 0) or 0) + 1
    if n_gpu_layers == 0 or not gpu_offload():
        return 0, total
    return (total if n_gpu_layers < 0 else min(n_gpu_layers, total)), total


def _tokenize(job: Mapping[str, Any]) -> dict[str, Any]:
    n_ctx = _n_ctx(job["model"])
    llm = _load(job["model"], n_ctx, job, logits_all=False, vocab_only=True)
    text = Path(job["text"]).read_text(encoding="utf-8")
    bos = bos_token(llm)
    room = n_ctx - (1 if bos is not None else 0)
    tokens = ([bos] if bos is not None else []) + llm.tokenize(text.encode("utf-8"), add_bos=False)[:room]
    if len(tokens) < MIN_TOKENS:
        raise WorkerUsage(f"the reference text gave only {len(tokens)} tokens")
    return {"tokens": [int(t) for t in tokens]}


def _logprobs(job: Mapping[str, Any]) -> tuple[Any, Any, float]:
    """Load the model, evaluate the job's tokens once; (llm, log-probabilities per position, seconds)."""
    tokens = list(job["tokens"])
    llm = _load(job["model"], max(len(tokens), 8), job, logits_all=True)
    t0 = time.perf_counter()
    llm.eval(tokens)
    elapsed = time.perf_counter() - t0
    return llm, log_softmax_rows(llm.scores[: len(tokens)]), elapsed


def _reference(job: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    _, logp, _ = _logprobs(job)
    k = min(TOP_K, logp.shape[1])
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    lps = np.take_along_axis(logp, ids, axis=1)
    return {"ids": ids.astype(int).tolist(), "logprobs": [[round(float(v), 6) for v in row] for row in lps]}


def _compare(job: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    tokens = [int(t) for t in job["tokens"]]
    if not MIN_TOKENS <= len(tokens) <= N_POSITIONS:  # the parent checked it; the worker's memory depends on it
        raise WorkerUsage(f"the reference has {len(tokens)} tokens; the builder writes {MIN_TOKENS} to {N_POSITIONS}")
    ids = np.asarray(job["ids"], dtype=np.int64)
    lp = np.asarray(job["logprobs"], dtype=np.float64)
    llm = _load(job["model"], max(len(tokens), MIN_TOKENS), job, logits_all=True)
    n_vocab = int(llm.n_vocab())
    # Checked again against the vocabulary llama.cpp loaded, before anything is evaluated: a negative id would index
    # from the end and an id past the vocabulary would crash, either way a made-up result.
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise WorkerUsage(f"reference.json: tokens: token {bad[0]} is not in this file's {n_vocab} tokens")
    if (
        ids.ndim != 2
        or ids.shape != lp.shape
        or ids.shape[0] != len(tokens)
        or ids.shape[1] != min(int(job["top_k"]), n_vocab)
    ):
        raise WorkerUsage(f"reference.json: ids: shape {ids.shape}, not {len(tokens)} rows of the builder's top-k")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_vocab):
        raise WorkerUsage(f"reference.json: ids: a token outside this file's {n_vocab} tokens")
    t0 = time.perf_counter()
    llm.eval(tokens)
    elapsed = time.perf_counter() - t0
    # Row by row: only the reference's top-k of each row and its arg-max are kept, never a tokens × vocabulary
    # float64 copy of llama.cpp's scores.
    lq = np.empty(ids.shape, dtype=np.float64)
    argmax = np.empty(len(tokens), dtype=np.int64)
    for i in range(len(tokens)):
        row = log_softmax_rows(llm.scores[i : i + 1])[0]
        lq[i] = row[ids[i]]
        argmax[i] = int(row.argmax())
    p, q = np.exp(lp), np.exp(lq)
    p_tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_tail = np.clip(1.0 - q.sum(axis=1), _TAIL_FLOOR, 1.0)
    kld = (p * (lp - lq)).sum(axis=1)
    has_tail = p_tail > _TAIL_FLOOR
    kld[has_tail] += p_tail[has_tail] * (np.log(p_tail[has_tail]) - np.log(q_tail[has_tail]))
    kld = np.maximum(kld, 0.0)  # rounding of the stored log-probabilities can give -1e-9 for identical runtimes
    top1 = float((argmax == ids[:, 0]).mean())
    if not np.isfinite(kld).all():
        raise RuntimeError("the runtime produced non-finite logits (NaN or inf)")
    bos = tokens[0] if tokens else None
    gen = generation_speed(llm, tokens[1:], bos)
    offloaded, total = _layers(job["model"], int(job["n_gpu_layers"]))
    llm.close()
    return {
        "kld_mean": float(kld.mean()),
        "kld_max": float(kld.max()),
        "top1_agreement": top1,
        "n_positions": len(tokens),
        "prompt_tps": len(tokens) / elapsed if elapsed > 0 else math.inf,
        "gen_tps": gen,
        # ru_maxrss is in KiB on Linux: the peak of this worker, which loaded this one file.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "offloaded_layers": offloaded,
        "total_layers": total,
    }


_ROLES = {"tokenize": _tokenize, "reference": _reference, "compare": _compare}


def _main(argv: list[str] | None = None) -> int:
    return serve_job(lambda job: _ROLES[job["role"]](job), argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(_main())
