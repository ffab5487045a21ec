"""Step 1: the pinned ``convert_hf_to_gguf.py`` turns the model folder into one base GGUF file.

Its failures are Python tracebacks meant for llama.cpp developers; :func:`explain_converter_failure` turns the
known ones into messages a user can act on.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import ConversionFailed, ConverterError, UnsupportedModel, UsageError
from .output import get_logger
from .processes import run_tool
from .source import ModelSource
from .threads import lease_cores
from .toolchain import LLAMA_CPP_PYTHON_VERSION

_log = get_logger("convert")

__all__ = ["explain_converter_failure", "run_converter"]

_TENSOR_LINE = re.compile(r"^INFO:hf-to-gguf:(\S+),\s+torch\.\w+ --> ")


def _last_error_line(tail: str) -> str:
    """The exception line of a traceback if there is one, else the last line (progress bars excluded)."""
    lines = [ln.strip() for ln in tail.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return line
    return next((ln for ln in reversed(lines) if "%|" not in ln), "(no output)")


def explain_converter_failure(tail: str, returncode: int, source: ModelSource) -> ConverterError:
    """Map the converter's last output lines to the most specific error we can explain."""
    if "BPE pre-tokenizer was not recognized" in tail:
        return UnsupportedModel(
            f"llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) does not recognise this model's BPE "
            "pre-tokenizer. The converter identifies a tokenizer by hashing how it splits a probe text, and only "
            "accepts tokenizers it has seen; a tokenizer trained from scratch or modified will not match.",
            hint="if the model reuses a known tokenizer (e.g. Llama-3's, Qwen2's, GPT-2's), copy that tokenizer's "
            "files unchanged into the model folder; a model that needs a new pre-tokenizer needs a llama.cpp release "
            "that adds it (convert_hf_to_gguf_update.py)",
        )
    match = re.search(r"Architecture '([^']+)' not supported", tail)
    if match:
        return UnsupportedModel(
            f"architecture {match.group(1)!r} is not supported by the pinned llama.cpp "
            f"(llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})"
        )
    if "No space left on device" in tail or re.search(r"OSError: \d+ requested and \d+ written", tail):
        return ConversionFailed(
            "the disk filled up while writing the base GGUF file; nothing was published",
            return_code=returncode,
            output_tail=tail,
            hint="free space next to the outputs folder (a conversion needs about 2× the model's size), then re-run",
        )
    if re.search(r"SafetensorError|Error while deserializing header|incomplete metadata|HeaderTooLarge", tail):
        return UsageError(
            f"the safetensors weights in {source.path} could not be read: {_last_error_line(tail)[:300]}",
            hint="download or copy the weights again",
        )
    if "Missing" in tail and "tokenizer" in tail:
        return UnsupportedModel(
            f"the tokenizer files in {source.path} are missing or incomplete: {_last_error_line(tail)[:300]}",
            hint="copy tokenizer.model / tokenizer.json / tokenizer_config.json from the original repository",
        )
    if returncode < 0:
        return ConversionFailed(
            f"the converter was killed by signal {-returncode} (out of memory?)",
            return_code=returncode,
            output_tail=tail,
            hint="large models need RAM about the size of their largest shard; close other jobs or use a bigger host",
        )
    last = _last_error_line(tail)
    return ConversionFailed(
        f"convert_hf_to_gguf.py failed (exit {returncode}): {last[:400]}",
        return_code=returncode,
        output_tail=tail,
        hint="the full converter output is in the log; run with -v to see it live",
    )


def run_converter(
    converter_dir: Path,
    source: ModelSource,
    outfile: Path,
    outtype: str,
    *,
    model_name: str,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
    mmproj: bool = False,
) -> None:
    """Convert ``source`` to ``outfile`` at ``outtype`` (f32, f16, bf16, q8_0, tq1_0, tq2_0).

    ``model_name`` is written as ``general.name`` so that the bytes do not depend on temporary paths. With
    ``mmproj`` the converter writes the model's multimodal projector (vision/audio encoder) instead of its text
    model (``--mmproj``; see :mod:`cecai_converter.multimodal`).

    Raises:
        UnsupportedModel, UsageError, ConversionFailed: see :func:`explain_converter_failure`.
    """
    argv = [
        sys.executable, str(converter_dir / "convert_hf_to_gguf.py"), str(source.path),
        "--outfile", str(outfile), "--outtype", outtype, "--model-name", model_name,
    ]  # fmt: skip
    if mmproj:
        argv.append("--mmproj")
    if metadata:
        meta_file = outfile.with_suffix(".metadata.json")
        meta_file.write_text(json.dumps(metadata, sort_keys=True))
        argv += ["--metadata", str(meta_file)]
    count = 0

    def on_line(line: str) -> None:
        nonlocal count
        if on_tensor is not None and _TENSOR_LINE.match(line):
            count += 1
            on_tensor(count)

    # Cores from the machine-wide lease (threads.py): the converter runs beside the source check's worker.
    with lease_cores(on_wait=_log.info) as cores:
        result = run_tool(
            argv,
            # Offline: a local folder needs nothing from the network, and a stalled lookup would hang the job.
            env={
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONWARNINGS": "ignore",
            },
            on_line=on_line,
            cores=cores,
        )
    if result.returncode != 0 or not outfile.is_file():
        raise explain_converter_failure(result.tail, result.returncode, source)
