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

import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .errors import AgreementFailed, ConfigError, WorkerFailed
from .gguf_header import read_header
from .tools import WorkerUsage, run_worker, runtime_env, runtime_name, serve_job

__all__ = [
    "N_POSITIONS",
    "REFERENCE_NAME",
    "REFERENCE_SCHEMA",
    "TOP_K",
    "AgreementFailed",
    "compare",
    "make_reference",
    "read_reference",
    "runtime_facts",
]

#: The reference's file name in an outputs folder.
REFERENCE_NAME: Final = "reference.json"
REFERENCE_SCHEMA: Final = 1
#: Positions evaluated: enough to see a systematic difference, small enough to run in seconds on any pair.
N_POSITIONS: Final = 128
#: Tokens kept per position.
TOP_K: Final = 32
_TAIL_FLOOR: Final = 1e-12


def runtime_facts(n_gpu_layers: int) -> dict[str, Any]:
    """What this machine's runtime is: device (cpu|cuda), CPU architecture, llama-cpp-python version, offload."""
    import llama_cpp

    return {
        "device": runtime_name(n_gpu_layers),
        "machine": platform.machine(),
        "llama_cpp_python": llama_cpp.__version__,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "n_gpu_layers": n_gpu_layers,
    }


def read_reference(path: Path) -> dict[str, Any]:
    """A reference written by :func:`make_reference`, checked for shape.

    Raises:
        ConfigError: missing, unreadable, or not a reference of this schema.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"no runtime reference at {path}",
            hint="make the files with `cecai-convert convert` (it writes reference.json next to manifest.json), "
            "or `run --reference`",
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable runtime reference ({exc})") from None
    ok = (
        isinstance(data, dict)
        and data.get("schema") == REFERENCE_SCHEMA
        and isinstance(data.get("tokens"), list)
        and all(isinstance(t, int) for t in data["tokens"])
        and isinstance(data.get("files"), dict)
    )
    if not ok:
        raise ConfigError(f"{path}: not a cecai-converter runtime reference (schema {REFERENCE_SCHEMA})")
    for name, entry in data["files"].items():
        rows = entry.get("ids") if isinstance(entry, dict) else None
        lps = entry.get("logprobs") if isinstance(entry, dict) else None
        if not (isinstance(rows, list) and isinstance(lps, list) and len(rows) == len(lps) == len(data["tokens"])):
            raise ConfigError(f"{path}: the entry for {name!r} does not have one row per token")
    reference: dict[str, Any] = data
    return reference


def make_reference(
    files: Mapping[str, Path],
    *,
    n_gpu_layers: int = 0,
    threads: int | None = None,
    text: Path | None = None,
) -> dict[str, Any]:
    """What this runtime predicts for each file on the fixed text (see the module docstring).

    Args:
        files: file name (as published) → path; files of one model (they share the tokenizer).
        n_gpu_layers: layers to offload (the builder's runtime setting).
        threads: CPU threads for llama.cpp.
        text: the text; default the shipped evaluation text.

    Returns:
        ``{schema, tokens, top_k, runtime, files: {name: {sha256?, ids, logprobs}}}``; the caller adds sha256.
    """
    from .fidelity import default_eval_text

    if not files:
        return {"schema": REFERENCE_SCHEMA, "tokens": [], "top_k": TOP_K, "files": {}}
    first = next(iter(files.values()))
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

    Raises:
        ConfigError: the reference has no entry for ``name``, or the file's vocabulary does not fit it.
        AgreementFailed: llama.cpp could not load or evaluate the file.
    """
    entry = reference["files"].get(name)
    if entry is None:
        raise ConfigError(f"the runtime reference has no entry for {name}", hint="make the files again")
    out = _run_worker(
        {
            "role": "compare",
            "model": str(path),
            "tokens": reference["tokens"],
            "ids": entry["ids"],
            "logprobs": entry["logprobs"],
        },
        n_gpu_layers,
        threads,
        label=name,
    )
    return Agreement(**out)


# --- the parent side -------------------------------------------------------------------------------------------


def _run_worker(job: dict[str, Any], n_gpu_layers: int, threads: int | None, *, label: str) -> dict[str, Any]:
    try:
        return run_worker(
            "cecai_converter.agreement",
            {**job, "n_gpu_layers": n_gpu_layers, "threads": threads},
            timeout=None,  # a check job has its own limit; one file's evaluation has no natural one
            name=f"agreement {job['role']}",
            env=runtime_env(n_gpu_layers),
        ).data
    except WorkerFailed as exc:
        if exc.kind == "usage":
            raise ConfigError(f"{label}: {exc.reason}") from None
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
    import llama_cpp

    header = read_header(Path(model))
    arch = header.metadata.get("general.architecture", "")
    total = int(header.metadata.get(f"{arch}.block_count", 0) or 0) + 1
    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return 0, total
    return (total if n_gpu_layers < 0 else min(n_gpu_layers, total)), total


def _tokenize(job: Mapping[str, Any]) -> dict[str, Any]:
    from .fidelity import bos_token

    n_ctx = _n_ctx(job["model"])
    llm = _load(job["model"], n_ctx, job, logits_all=False, vocab_only=True)
    text = Path(job["text"]).read_text(encoding="utf-8")
    bos = bos_token(llm)
    room = n_ctx - (1 if bos is not None else 0)
    tokens = ([bos] if bos is not None else []) + llm.tokenize(text.encode("utf-8"), add_bos=False)[:room]
    if len(tokens) < 8:
        raise WorkerUsage(f"the reference text gave only {len(tokens)} tokens")
    return {"tokens": [int(t) for t in tokens]}


def _logprobs(job: Mapping[str, Any]) -> tuple[Any, Any, float]:
    """Load the model, evaluate the job's tokens once; (llm, log-probabilities per position, seconds)."""
    from .fidelity import log_softmax_rows

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

    from .fidelity import generation_speed

    llm, logq, elapsed = _logprobs(job)
    ids = np.asarray(job["ids"], dtype=np.int64)
    if ids.size and int(ids.max()) >= logq.shape[1]:
        raise WorkerUsage(f"the reference names token {int(ids.max())}, beyond this file's {logq.shape[1]} tokens")
    lp = np.asarray(job["logprobs"], dtype=np.float64)
    lq = np.take_along_axis(logq.astype(np.float64), ids, axis=1)
    p, q = np.exp(lp), np.exp(lq)
    p_tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_tail = np.clip(1.0 - q.sum(axis=1), _TAIL_FLOOR, 1.0)
    kld = (p * (lp - lq)).sum(axis=1)
    has_tail = p_tail > _TAIL_FLOOR
    kld[has_tail] += p_tail[has_tail] * (np.log(p_tail[has_tail]) - np.log(q_tail[has_tail]))
    kld = np.maximum(kld, 0.0)  # rounding of the stored log-probabilities can give -1e-9 for identical runtimes
    top1 = float((logq.argmax(axis=1) == ids[:, 0]).mean())
    if not np.isfinite(kld).all():
        raise RuntimeError("the runtime produced non-finite logits (NaN or inf)")
    tokens = list(job["tokens"])
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
