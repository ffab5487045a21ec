"""Step 2: llama.cpp's quantizer makes each requested type from the base file.

The quantizer is the installed ``llama_cpp`` (``llama_model_quantize``), so it is the same llama.cpp as the runtime.
It runs in a worker process (``python -m cecai_converter.quantize``): llama.cpp aborts the process on some errors,
and a child can be stopped on Ctrl-C. The worker uses every core unless told otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import ConversionFailed, UsageError
from .precisions import PrecisionInfo
from .tools import failure_summary, run_tool

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
) -> None:
    """Quantize ``base`` to ``dest`` at ``precision``.

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
    argv = [sys.executable, "-m", "cecai_converter.quantize", str(base), str(dest), str(precision.ftype)]
    argv += ["--threads", str(threads or os.cpu_count() or 1)]
    if imatrix is not None:
        argv += ["--imatrix", str(imatrix)]

    def on_line(line: str) -> None:
        match = _PROGRESS.match(line)
        if match and on_progress is not None:
            on_progress(int(match.group(1)), int(match.group(2)))

    result = run_tool(argv, on_line=on_line)
    if result.returncode != 0 or not dest.is_file():
        written = dest.stat().st_size if dest.is_file() else 0
        free = _free_bytes(dest.parent)
        dest.unlink(missing_ok=True)  # a partial file is no use to anyone
        # llama.cpp writes with C++ streams: a full disk reaches us only as "basic_ios::clear: iostream error".
        write_failed = any(s in result.tail for s in ("iostream error", "No space left on device", "failed to write"))
        if write_failed and free is not None and free < max(base.stat().st_size - written, 1 << 20):
            raise ConversionFailed(
                f"quantizing to {precision.name} failed: the disk is full: llama.cpp could not finish writing "
                f"{dest.name} in {dest.parent} ({free / 1e6:.1f} MB were free there, "
                f"{written / 1e6:.1f} MB written); the partial file was removed",
                return_code=result.returncode,
                output_tail=result.tail,
                hint=f"free space on the filesystem of {dest.parent} (a quantized file needs up to the base's "
                f"{base.stat().st_size / 1e6:.1f} MB), then re-run",
            )
        if write_failed:
            hint = (
                f"writing {dest} failed (llama.cpp says only 'iostream error'): check that the filesystem is "
                "writable and not full, then re-run"
            )
        elif "imatrix" in result.tail.lower():
            hint = "this type needs an importance matrix that covers every tensor: give --imatrix or --calibration-text"
        else:
            hint = "the quantizer's full output is in the log; run with -v to see it live"
        raise ConversionFailed(
            f"quantizing to {precision.name} failed (exit {result.returncode}): {failure_summary(result.tail)}",
            return_code=result.returncode,
            output_tail=result.tail,
            hint=hint,
        )


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _worker(argv: list[str] | None = None) -> int:
    """The child process: one ``llama_model_quantize`` call."""
    parser = argparse.ArgumentParser(prog="python -m cecai_converter.quantize")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("ftype", type=int)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--imatrix")
    args = parser.parse_args(argv)

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = args.ftype
    params.nthread = args.threads
    keepalive = None
    if args.imatrix:
        from .imatrix import load_for_quantize

        keepalive = load_for_quantize(Path(args.imatrix))
        keepalive.apply(params)  # also records quantize.imatrix.* metadata, as llama-quantize does
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.dst.encode(), ctypes.byref(params))
    del keepalive
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(_worker())
