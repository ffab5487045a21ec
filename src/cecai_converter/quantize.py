"""Step 2: llama.cpp's quantizer makes each requested type from the base file.

The quantizer is the installed ``llama_cpp`` (``llama_model_quantize``), so it is the same llama.cpp as the runtime.
It runs in a worker process (``python -m cecai_converter.quantize``, served by :func:`processes.serve_job`): llama.cpp
aborts the process on some errors, and a child can be stopped on Ctrl-C. The worker uses every core unless told
otherwise.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConversionFailed, UsageError, WorkerFailed
from .imatrix import load_for_quantize
from .output import get_logger
from .precisions import PrecisionInfo
from .processes import run_worker, serve_job
from .quant_types import needs_imatrix, parse_fallbacks, rule_type_id

__all__ = ["quantize"]

_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
#: ggml.h's GGML_TYPE_COUNT: the type that ends llama.cpp's override array
_GGML_TYPE_COUNT = 43
#: llama.cpp's closing count: "llama_model_quantize_impl: WARNING: 3 of 75 tensor(s) required fallback quantization"
_FALLBACK_COUNT = re.compile(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback quantization")
_log = get_logger("quantize")


def quantize(
    base: Path,
    dest: Path,
    precision: PrecisionInfo,
    *,
    threads: int | None = None,
    imatrix: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    timeout: float | None = None,
    tensor_types: Sequence[str] = (),
) -> list[dict[str, str]]:
    """Quantize ``base`` to ``dest`` at ``precision``.

    Args:
        base: the unquantized GGUF.
        dest: the file to write; removed again when the quantizer fails.
        precision: the type to make.
        threads: CPU threads (default: every core).
        imatrix: an importance-matrix file (GGUF or legacy ``.dat``).
        on_progress: called with (tensors done, tensors in all) as the quantizer reports them.
        timeout: seconds before the quantizer is stopped; ``None``: no limit.
        tensor_types: per-tensor overrides, ``PATTERN=TYPE`` as :func:`.quant_types.parse_rule` normalises them
            (llama-quantize's ``--tensor-type``), passed to the quantizer in order.

    Returns:
        every tensor the quantizer wrote in another type than the recipe asked for, as llama.cpp logged it
        (``tensor``, ``asked``, ``written``, ``reason``; see :func:`.quant_types.parse_fallbacks`).

    Raises:
        UsageError: the type, or an override's type, needs an importance matrix and none was given.
        ConversionFailed: the quantizer failed; the message carries its last output lines.
    """
    if precision.needs_imatrix and imatrix is None:
        raise UsageError(
            f"{precision.name} needs an importance matrix: llama.cpp refuses to make it without one",
            hint="give one with --imatrix FILE, or compute one with --imatrix auto; "
            "or choose a k-quant such as Q2_K / Q3_K_S",
        )
    if imatrix is None and needs_imatrix(tensor_types):
        raise UsageError(
            f"the tensor type override(s) {', '.join(needs_imatrix(tensor_types))} need an importance matrix: "
            "llama.cpp refuses to write those types without one",
            hint="give one with --imatrix FILE or --imatrix auto, or choose another type in TENSOR_TYPES",
        )
    job = {
        "src": str(base),
        "dst": str(dest),
        "ftype": precision.ftype,
        "threads": threads,  # None: the cores this worker is granted (threads.py; processes.serve_job fills it in)
        "imatrix": str(imatrix) if imatrix is not None else None,
        "tensor_types": list(tensor_types),
    }

    def on_line(line: str) -> None:
        match = _PROGRESS.match(line)
        if match and on_progress is not None:
            on_progress(int(match.group(1)), int(match.group(2)))

    failure: WorkerFailed | str | None = None
    fallbacks: list[dict[str, str]] = []
    try:
        run = run_worker(
            "cecai_converter.quantize", job, timeout=timeout, name="quantizer", on_line=on_line, threads=threads
        )
        fallbacks = [{str(k): str(v) for k, v in f.items()} for f in run.data.get("fallbacks") or []]
        if len(fallbacks) != run.data.get("n_fallback", len(fallbacks)):
            # llama.cpp counted more fallbacks than its lines say: its wording changed; the record would be short.
            _log.warning(
                "llama.cpp reports %s fallback(s) in %s, %d were read from its log: the record lists only those",
                run.data.get("n_fallback"), dest.name, len(fallbacks),
            )  # fmt: skip
        if not dest.is_file():
            failure = "it wrote no file"
    except WorkerFailed as exc:
        failure = exc
    if failure is not None:
        _raise_failed(base, dest, precision, failure)
    return fallbacks


def _raise_failed(base: Path, dest: Path, precision: PrecisionInfo, failure: WorkerFailed | str) -> NoReturn:
    """The error for a quantizer run that failed: a full disk said as such, else the quantizer's own words."""
    return_code: int | None = 0
    if isinstance(failure, str):
        tail, summary = "", failure
    else:
        tail, return_code = failure.output_tail, failure.return_code
        summary = failure.reason if failure.kind == "timeout" else failure.summary or failure.reason
    written = dest.stat().st_size if dest.is_file() else 0
    free = _free_bytes(dest.parent)
    dest.unlink(missing_ok=True)  # a partial file is no use to anyone
    # llama.cpp writes with C++ streams: a full disk reaches us only as "basic_ios::clear: iostream error".
    write_failed = any(s in tail for s in ("iostream error", "No space left on device", "failed to write"))
    if write_failed and free is not None and free < max(base.stat().st_size - written, 1 << 20):
        raise ConversionFailed(
            f"quantizing to {precision.name} failed: the disk is full: llama.cpp could not finish writing "
            f"{dest.name} in {dest.parent} ({free / 1e6:.1f} MB were free there, "
            f"{written / 1e6:.1f} MB written); the partial file was removed",
            return_code=return_code,
            output_tail=tail,
            hint=f"free space on the filesystem of {dest.parent} (a quantized file needs up to the base's "
            f"{base.stat().st_size / 1e6:.1f} MB), then re-run",
        )
    if write_failed:
        hint = (
            f"writing {dest} failed (llama.cpp says only 'iostream error'): check that the filesystem is "
            "writable and not full, then re-run"
        )
    elif "imatrix" in tail.lower():
        hint = "this type needs an importance matrix that covers every tensor: give --imatrix or --calibration-text"
    else:
        hint = "the quantizer's full output is in the log; run with -v to see it live"
    raise ConversionFailed(
        f"quantizing to {precision.name} failed (exit {return_code}): {summary}",
        return_code=return_code,
        output_tail=tail,
        hint=hint,
    )


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _quantize(job: Mapping[str, Any]) -> dict[str, Any]:
    """The worker's job: one ``llama_model_quantize`` call."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(job["ftype"])
    params.nthread = int(job["threads"])
    # llama.cpp's warnings (fallbacks to another type) are the record of what the quantizer chose: kept, and
    # still printed as llama-cpp-python's own logger prints them (the parent reads its progress lines from them).
    said: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunk = text.decode("utf-8", errors="replace")
        said.append(chunk)
        print(chunk, end="", flush=True, file=sys.stderr)

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    rules = [rule_type_id(rule) for rule in job.get("tensor_types") or []]
    overrides = None
    if rules:
        # A C array of {pattern, type} ended by {NULL, GGML_TYPE_COUNT}, as llama-quantize builds it; the pattern
        # bytes are kept alive by the array for the call.
        overrides = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
        for slot, (pattern, type_id) in zip(overrides, rules, strict=False):
            slot.pattern, slot.type = pattern.encode(), type_id
        overrides[len(rules)].pattern, overrides[len(rules)].type = None, _GGML_TYPE_COUNT
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    keepalive = None
    if job["imatrix"]:
        keepalive = load_for_quantize(Path(job["imatrix"]))
        keepalive.apply(params)  # also records quantize.imatrix.* metadata, as llama-quantize does
    rc = llama_cpp.llama_model_quantize(str(job["src"]).encode(), str(job["dst"]).encode(), ctypes.byref(params))
    del keepalive, overrides
    if rc != 0:
        # llama.cpp has printed why (its exception text) just before; the parent shows that line.
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    log = "".join(said)
    counted = _FALLBACK_COUNT.search(log)
    return {"fallbacks": parse_fallbacks(log), "n_fallback": int(counted.group(1)) if counted else 0}


if __name__ == "__main__":
    sys.exit(serve_job(_quantize))
