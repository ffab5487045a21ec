"""Step 3: every output is read back and loaded before it is published.

Two checks: the file's structure with ``gguf``'s reader (magic, version, architecture, tensor count, and a
``general.file_type`` that matches the precision asked for), then a real load in llama-cpp-python that generates a
few tokens greedily. The load runs in a worker process (``python -m cecai_converter.verify``, served by
:func:`processes.serve_job`) because llama.cpp can abort the process on a broken file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import VerificationFailed, WorkerFailed
from .gguf_header import GGUFHeaderError, TensorInfo, read_header
from .precisions import PRECISIONS, PrecisionInfo
from .processes import run_worker, serve_job, worker_failure_why
from .runtime import runtime_env, runtime_name

__all__ = ["FileFacts", "LoadCheck", "generate_check", "load_check", "load_check_many", "read_back"]

PROMPT = "Hello world"
GENERATE_TOKENS = 8


@dataclass(frozen=True)
class FileFacts:
    """What the GGUF reader found in a file."""

    version: int
    architecture: str
    tensor_count: int
    file_type: int | None
    precision: str | None
    name: str | None
    n_params: int
    #: every tensor's name, shape and type as written (the manifest's ``quantization`` record is made from them)
    tensors: tuple[TensorInfo, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class LoadCheck:
    """The result of loading a file in llama-cpp-python and generating from it."""

    runtime: str
    n_vocab: int
    prompt: str
    generated_tokens: list[int] = field(default_factory=list)
    text: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy for the manifest."""
        return asdict(self)


def _is_known_ftype(value: object) -> bool:
    from gguf.constants import LlamaFileType

    if not isinstance(value, int) or isinstance(value, bool):
        return False
    try:
        LlamaFileType(value)
    except ValueError:
        return False
    return True


def file_type_label(facts: FileFacts) -> str:
    """How a file's type reads in a listing: the precision name, else llama.cpp's name for it, else 'no file type'."""
    if facts.precision is not None:
        return facts.precision
    if facts.file_type is None:
        return "(no general.file_type)"
    from gguf.constants import LlamaFileType

    return f"{LlamaFileType(facts.file_type).name} (file type {facts.file_type})"


def read_back(path: Path, expected: PrecisionInfo | None = None) -> FileFacts:
    """Read a GGUF file's header, metadata and tensor infos, and check them against ``expected``.

    Raises:
        VerificationFailed: the file is not a readable GGUF, has no architecture or tensors, or its file type is
            not the precision asked for.
    """
    try:
        header = read_header(path)
    except (GGUFHeaderError, OSError) as exc:
        raise VerificationFailed(f"{path.name} is not a readable GGUF file: {exc}") from None
    version = header.version
    architecture = header.metadata.get("general.architecture")
    file_type = header.metadata.get("general.file_type")
    name = header.metadata.get("general.name")
    if not architecture:
        raise VerificationFailed(f"{path.name} has no general.architecture")
    if not header.tensors:
        raise VerificationFailed(f"{path.name} holds no tensors")
    if file_type is not None and not _is_known_ftype(file_type):
        raise VerificationFailed(
            f"{path.name}: general.file_type is {file_type!r:.40}, which is not a llama.cpp file type "
            "(an integer of gguf.LlamaFileType)"
        )
    by_ftype = {info.ftype: info.name for info in PRECISIONS.values()}
    precision = by_ftype.get(int(file_type)) if file_type is not None else None
    if expected is not None and (file_type is None or int(file_type) != expected.ftype):
        raise VerificationFailed(
            f"{path.name}: general.file_type is {file_type} ({precision or 'unknown'}), "
            f"expected {expected.ftype} ({expected.name})"
        )
    return FileFacts(
        version=int(version) if version is not None else 0,
        architecture=str(architecture),
        tensor_count=len(header.tensors),
        file_type=int(file_type) if file_type is not None else None,
        precision=precision,
        name=str(name) if name is not None else None,
        n_params=sum(t.n_elements for t in header.tensors),
        tensors=header.tensors,
    )


def load_check(
    path: Path, *, n_gpu_layers: int = 0, threads: int | None = None, timeout: float | None = None
) -> LoadCheck:
    """Load ``path`` in llama-cpp-python (in a worker process) and generate a few tokens greedily.

    Raises:
        VerificationFailed: the runtime could not load the file, or produced nothing.
    """
    return load_check_many([path], n_gpu_layers=n_gpu_layers, threads=threads, timeout=timeout)[path]


def load_check_many(
    paths: list[Path], *, n_gpu_layers: int = 0, threads: int | None = None, timeout: float | None = None
) -> dict[Path, LoadCheck]:
    """:func:`load_check` for several files in one worker process (one interpreter and runtime start-up).

    The worker says which file it is loading before it loads it, so when llama.cpp aborts on a broken file the
    message names that file.

    Args:
        paths: GGUF files.
        n_gpu_layers: layers to offload (0: the GPUs are hidden, see :func:`runtime.runtime_env`).
        threads: CPU threads (default: every core).
        timeout: seconds for all the files together; ``None``: no limit.

    Raises:
        VerificationFailed: for the first file that could not be loaded or generated nothing.
    """
    # threads None: the cores this worker is granted (threads.py; processes.serve_job fills it in)
    job = {"paths": [str(p) for p in paths], "n_gpu_layers": n_gpu_layers, "threads": threads}
    loading: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith(_LOADING):
            loading.append(line[len(_LOADING) :])

    try:
        run = run_worker(
            "cecai_converter.verify", job, timeout=timeout, name="verification", env=runtime_env(n_gpu_layers),
            on_line=on_line, threads=threads,
        )  # fmt: skip
    except WorkerFailed as exc:
        failing = Path(loading[-1]).name if loading else ", ".join(p.name for p in paths)
        why = worker_failure_why(exc, progress_prefix=_LOADING)
        raise VerificationFailed(
            f"llama-cpp-python could not load {failing} ({why}",
            hint="the file was not published; the log has the runtime's full output",
        ) from None
    done = {Path(item.pop("path")): LoadCheck(**item) for item in run.data["checks"]}
    for path in paths:
        check = done.get(path)
        if check is None:
            raise VerificationFailed(f"the verification worker reported nothing for {path.name}")
        if not check.generated_tokens:
            raise VerificationFailed(f"{path.name} loaded but generated no tokens")
    return done


#: The line the worker prints before it loads a file: the file that was loading when llama.cpp aborted is named.
_LOADING = "cecai-verify: loading "


def _load_and_generate(job: Mapping[str, Any]) -> dict[str, Any]:
    """The worker's job: load each file and generate a few tokens greedily."""
    import llama_cpp

    n_gpu_layers = int(job["n_gpu_layers"])
    checks: list[dict[str, Any]] = []
    for path in job["paths"]:
        print(_LOADING + path, flush=True)
        llm = llama_cpp.Llama(
            path, n_ctx=128, n_gpu_layers=n_gpu_layers, n_threads=job["threads"] or None,
            n_threads_batch=job["threads"] or None, seed=0, verbose=False,  # batch: else every core for the prompt
        )  # fmt: skip
        checks.append({"path": path, **generate_check(llm, n_gpu_layers)})
        llm.close()
    return {"checks": checks}


def generate_check(llm: Any, n_gpu_layers: int) -> dict[str, Any]:
    """The load-and-generate record (:class:`LoadCheck`'s fields) of a model loaded in this worker: a few tokens
    generated greedily from :data:`PROMPT`. Also called by fidelity's worker, which verifies a file in the load
    that measures it."""
    prompt_tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    generated: list[int] = []
    for token in llm.generate(prompt_tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        generated.append(int(token))
        if len(generated) >= GENERATE_TOKENS:
            break
    return {
        "runtime": runtime_name(n_gpu_layers),
        "n_vocab": int(llm.n_vocab()),
        "prompt": PROMPT,
        "generated_tokens": generated,
        "text": llm.detokenize(generated).decode("utf-8", errors="replace"),
    }


if __name__ == "__main__":
    sys.exit(serve_job(_load_and_generate))
