"""Step 2: llama.cpp's quantizer makes each requested type from the base file.

The quantizer is the installed ``llama_cpp`` (``llama_model_quantize``), so it is the same llama.cpp as the runtime.
It runs in a worker process (``python -m cecai_converter.quantize``, served by :func:`tools.serve_job`): llama.cpp
aborts the process on some errors, and a child can be stopped on Ctrl-C. The worker uses every core unless told
otherwise.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConversionFailed, UsageError, WorkerFailed
from .precisions import PrecisionInfo
from .tools import run_worker, serve_job

__all__ = ["quantize"]

_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def quantize(
    base: Path,
    dest: Path,
    precision: PrecisionInfo,
    *,
    threads: int | None = None,
    imatrix: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    timeout: float | None = None,
) -> None:
    """Quantize ``base`` to ``dest`` at ``precision``.

    Args:
        base: the unquantized GGUF.
        dest: the file to write; removed again when the quantizer fails.
        precision: the type to make.
        threads: CPU threads (default: every core).
        imatrix: an importance-matrix file (GGUF or legacy ``.dat``).
        on_progress: called with (tensors done, tensors in all) as the quantizer reports them.
        timeout: seconds before the quantizer is stopped; ``None``: no limit.

    Raises:
        UsageError: the type needs an importance matrix and none was given.
        ConversionFailed: the quantizer failed; the message carries its last output lines.
    """
    if precision.needs_imatrix and imatrix is None:
        raise UsageError(
            f"{precision.name} needs an importance matrix: llama.cpp refuses to make it without one",
            hint="give one with --imatrix FILE, or compute one with --imatrix auto; "
            "or choose a k-quant such as Q2_K / Q3_K_S",
        )
    job = {
        "src": str(base),
        "dst": str(dest),
        "ftype": precision.ftype,
        "threads": threads or os.cpu_count() or 1,
        "imatrix": str(imatrix) if imatrix is not None else None,
    }

    def on_line(line: str) -> None:
        match = _PROGRESS.match(line)
        if match and on_progress is not None:
            on_progress(int(match.group(1)), int(match.group(2)))

    failure: WorkerFailed | str | None = None
    try:
        run_worker("cecai_converter.quantize", job, timeout=timeout, name="quantizer", on_line=on_line)
        if not dest.is_file():
            failure = "it wrote no file"
    except WorkerFailed as exc:
        failure = exc
    if failure is not None:
        _raise_failed(base, dest, precision, failure)


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
    keepalive = None
    if job["imatrix"]:
        from .imatrix import load_for_quantize

        keepalive = load_for_quantize(Path(job["imatrix"]))
        keepalive.apply(params)  # also records quantize.imatrix.* metadata, as llama-quantize does
    rc = llama_cpp.llama_model_quantize(str(job["src"]).encode(), str(job["dst"]).encode(), ctypes.byref(params))
    del keepalive
    if rc != 0:
        # llama.cpp has printed why (its exception text) just before; the parent shows that line.
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {}


if __name__ == "__main__":
    sys.exit(serve_job(_quantize))
