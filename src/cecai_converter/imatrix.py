"""Importance matrices: build llama.cpp's ``llama-imatrix``, compute an imatrix, hand it to the quantizer.

* ``llama-imatrix`` is built from the pinned sdist by :func:`.llama_programs.build_tools`.
* :func:`compute` runs it on the base GGUF and a calibration text (default: the shipped ``data/calibration.txt``,
  public-domain prose) and writes a GGUF-format imatrix.
* :func:`load_for_quantize` reads an imatrix file (GGUF, or llama.cpp's legacy ``.dat``) the way
  ``llama-quantize`` does and returns an :class:`ImatrixData`, whose :meth:`ImatrixData.apply` sets
  ``params.imatrix`` (and the ``quantize.imatrix.*`` metadata overrides) on ``llama_model_quantize_params``.

IQ1/IQ2 types, IQ3_XXS and Q2_K_S are refused by llama.cpp without an imatrix; K-quants take one optionally.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from . import llama_vocab
from .errors import ConfigError, ConversionFailed, ToolNotFound, UsageError
from .llama_programs import build_tools
from .output import get_logger
from .processes import run_tool
from .texts import MAX_TEXT_TOKENS
from .threads import lease_cores

__all__ = [
    "DEFAULT_CALIBRATION_TEXT",
    "ImatrixData",
    "compute",
    "default_calibration_text",
    "explain_failure",
    "load_for_quantize",
    "read_imatrix",
]

_log = get_logger("imatrix")

#: The shipped calibration text (public domain: Declaration of Independence, two Lincoln addresses).
DEFAULT_CALIBRATION_TEXT: Final = "calibration.txt"
_TAIL_CHARS: Final = 4000
# Metadata keys llama-quantize writes when it uses an imatrix (tools/quantize/quantize.cpp).
_KV_FILE: Final = b"quantize.imatrix.file"
_KV_DATASET: Final = b"quantize.imatrix.dataset"
_KV_N_ENTRIES: Final = b"quantize.imatrix.entries_count"
_KV_N_CHUNKS: Final = b"quantize.imatrix.chunks_count"
_KV_TAG_INT: Final = 0
_KV_TAG_STR: Final = 3


def default_calibration_text() -> Path:
    """The calibration text that ships with the package."""
    return Path(str(resources.files("cecai_converter") / "data" / DEFAULT_CALIBRATION_TEXT))


# --- computing an imatrix ----------------------------------------------------------------------------------------

_TOO_SHORT = re.compile(r"you need at least (\d+) tokens for a context of (\d+) tokens")
_ONLY = re.compile(r"tokenizes to only (\d+) tokens")
# Every line llama.cpp's own logger writes starts with a timestamp like "0.00.013.903 I ".
_LLAMA_LOG_LINE = re.compile(r"^\d+\.\d{2}\.\d{3}\.\d{3} [IWED] ", re.MULTILINE)


def _too_short(text_name: str, have: int | None, need: int, n_ctx: int) -> UsageError:
    counted = f"only {have} tokens" if have is not None else "too few tokens"
    return UsageError(
        f"imatrix: the calibration text {text_name} has {counted} for this model's tokenizer; "
        f"llama-imatrix needs at least {need} (two chunks of n_ctx={n_ctx})",
        hint="use a longer CALIBRATION_TEXT (a few thousand words of text like the model's use), or a smaller n_ctx",
    )


def explain_failure(output: str, *, base_name: str, text_name: str, return_code: int) -> UsageError | ConversionFailed:
    """The error for a failed ``llama-imatrix`` run, from its captured output.

    llama.cpp's logger is asynchronous and never flushed at exit (common/log.cpp leaks it on purpose), so under
    load a failing run can lose its last lines, often the reason itself. The message says so when that happened.
    """
    short = _TOO_SHORT.search(output)
    if short:
        only = _ONLY.search(output)
        return _too_short(text_name, int(only.group(1)) if only else None, int(short.group(1)), int(short.group(2)))
    tail = output[-_TAIL_CHARS:].strip()
    lost = (
        ""
        if _LLAMA_LOG_LINE.search(output)
        else (
            "\n(llama.cpp wrote none of its log lines before exiting: it drops unflushed lines at exit; "
            "rerun to see the reason)"
        )
    )
    return ConversionFailed(
        f"llama-imatrix failed on {base_name} (exit status {return_code})\n"
        f"--- llama-imatrix output (tail) ---\n{tail}{lost}",
        return_code=return_code,
        output_tail=output[-_TAIL_CHARS:],
        hint="check that the base GGUF loads (`cecai-convert verify`); or give a ready imatrix (IMATRIX: file)",
    )


def compute(
    base: Path,
    calibration_text: Path | None,
    out: Path,
    *,
    n_threads: int | None = None,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    tools: dict[str, Path] | None = None,
    timeout_s: float | None = None,
) -> Path:
    """Compute an importance matrix of ``base`` on a calibration text with llama.cpp's ``llama-imatrix``.

    Args:
        base: the unquantized base GGUF (F32/F16/BF16).
        calibration_text: a UTF-8 text of at least ``2 × n_ctx`` tokens; ``None``: the shipped text.
        out: the imatrix file to write (GGUF format); written atomically.
        n_threads: CPU threads (default: llama.cpp's choice).
        n_ctx: chunk length; the text must tokenize to at least two chunks.
        max_chunks: process at most this many chunks (``--chunks``), to bound the time on big models.
        tools: the result of :func:`build_tools` (default: built or found now).
        timeout_s: give up after this many seconds.

    Returns:
        ``out``.

    Raises:
        UsageError: a file is missing or the text is too short for ``n_ctx`` (the message gives the token count).
        ConversionFailed: llama-imatrix failed; the message keeps its output tail.
    """
    text = Path(calibration_text) if calibration_text is not None else default_calibration_text()
    if not Path(base).is_file():
        raise UsageError(f"imatrix: base GGUF not found: {base}")
    if not text.is_file():
        raise ConfigError(
            f"imatrix: calibration text not found: {text}",
            hint="CALIBRATION_TEXT is relative to configurations/; remove it to use the shipped text",
        )
    # Check the length first: the tool's own "too short" message can be lost (see explain_failure).
    # add_special, as llama-imatrix's common_tokenize(ctx, prompt, true) does
    have = llama_vocab.count_tokens(base, text, add_special=True)
    if have is not None and have < 2 * n_ctx:
        raise _too_short(text.name, have, 2 * n_ctx, n_ctx)
    exe = (tools or build_tools())["llama-imatrix"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.partial.gguf")
    # Run next to the text and name it relatively: llama-imatrix records the name as the dataset, and the quantizer
    # copies it into every output's metadata (quantize.imatrix.dataset), where a local path does not belong.
    text = text.resolve()
    cmd = [str(exe), "-m", str(Path(base).resolve()), "-f", text.name, "-o", str(tmp_out.resolve()), "-c", str(n_ctx)]
    cmd += ["-b", str(n_ctx), "--output-format", "gguf", "--no-ppl", "-ngl", "0"]

    # The work stays bounded whatever the text: at most MAX_TEXT_TOKENS tokens' worth of chunks.
    cap = max(2, MAX_TEXT_TOKENS // n_ctx)
    cmd += ["--chunks", str(min(max_chunks, cap) if max_chunks else cap)]
    # Its threads come from the machine-wide lease (threads.py), as every llama.cpp worker's do.
    with lease_cores(n_threads, on_wait=_log.info) as cores:
        cmd += ["-t", str(cores.threads)]
        _log.debug("$ %s", " ".join(cmd))
        # A long tail: explain_failure looks for the tool's "too short" message and any llama.cpp log line in it.
        run = run_tool(cmd, cwd=text.parent, timeout=timeout_s, tail_lines=2000, cores=cores)
    if run.timed_out:
        tmp_out.unlink(missing_ok=True)
        raise ConversionFailed(
            f"llama-imatrix did not finish within {timeout_s:g} s; it was stopped",
            hint="limit the chunks (max_chunks), use a shorter calibration text, or give an IMATRIX file",
        )
    if run.returncode != 0 or not tmp_out.is_file():
        tmp_out.unlink(missing_ok=True)
        raise explain_failure(run.tail, base_name=Path(base).name, text_name=text.name, return_code=run.returncode)
    tmp_out.replace(out)
    return out


# --- loading an imatrix for llama_model_quantize -----------------------------------------------------------------


def read_imatrix(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an imatrix file as ``llama-quantize`` does: ``(name → float32 vector, info)``.

    GGUF files (``<name>.in_sum2`` / ``<name>.counts`` tensors) are normalised by the per-expert counts (a zero
    count gives ones); legacy ``.dat`` files are divided by their call count. ``info`` holds ``datasets``,
    ``chunk_count``, ``chunk_size`` and ``legacy``.

    Raises:
        UsageError: the file is missing, unreadable, or not an imatrix.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"imatrix file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        data, info = _read_gguf_imatrix(path)
    else:
        data, info = _read_legacy_imatrix(path)
    if not data:
        raise UsageError(f"{path} holds no importance-matrix entries", hint="recompute it with llama-imatrix")
    for name, values in data.items():
        if not np.all(np.isfinite(values)):
            raise UsageError(
                f"{path}: the importance matrix of {name} contains NaN or inf values",
                hint="llama.cpp refuses it; recompute the imatrix",
            )
    return data, info


def _read_gguf_imatrix(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot read the imatrix {path}: {exc}") from None
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for tensor in reader.tensors:
        if tensor.name.endswith(".in_sum2"):
            target, key = sums, tensor.name[: -len(".in_sum2")]
        elif tensor.name.endswith(".counts"):
            target, key = counts, tensor.name[: -len(".counts")]
        else:
            continue
        if tensor.tensor_type != GGMLQuantizationType.F32:
            raise UsageError(f"{path}: {tensor.name} must be F32, is {tensor.tensor_type.name}")
        target[key] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise UsageError(
            f"{path} is a GGUF file but not an importance matrix (no .in_sum2/.counts tensors)",
            hint="pass the file llama-imatrix wrote, not a model",
        )
    data: dict[str, Any] = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise UsageError(f"{path}: mismatched sums and counts for {name}")
        s, c = sums[name], np.rint(counts[name]).astype(np.float32)
        if c.size == 0 or s.size % c.size:
            raise UsageError(
                f"{path}: {name}: {s.size} sums do not divide into {c.size} counts",
                hint="recompute it with llama-imatrix",
            )
        ne0 = s.size // c.size
        e = np.ones(s.size, dtype=np.float32).reshape(c.size, ne0)
        nonzero = c > 0
        e[nonzero] = s.reshape(c.size, ne0)[nonzero] / c[nonzero, None]
        data[name] = np.ascontiguousarray(e.reshape(-1))

    def field_value(key: str) -> Any:
        fld = reader.get_field(key)
        return None if fld is None else fld.contents()

    datasets = field_value("imatrix.datasets") or []
    info = {
        "datasets": [str(d) for d in (datasets if isinstance(datasets, list) else [datasets])],
        "chunk_count": int(field_value("imatrix.chunk_count") or 0),
        "chunk_size": int(field_value("imatrix.chunk_size") or 0),
        "legacy": False,
    }
    return data, info


def _read_legacy_imatrix(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    raw = path.read_bytes()
    pos = 0

    def take(fmt: str, n: int = 1) -> Any:
        nonlocal pos
        size = np.dtype(fmt).itemsize * n
        if pos + size > len(raw):
            raise UsageError(
                f"{path} is neither a GGUF imatrix nor a complete legacy imatrix (.dat) file",
                hint="pass the file llama-imatrix wrote",
            )
        value = np.frombuffer(raw, dtype=fmt, count=n, offset=pos)
        pos += size
        return value

    n_entries = int(take("<i4")[0])
    if n_entries < 1 or n_entries > 1_000_000:
        raise UsageError(f"{path} is not an importance matrix (GGUF or legacy .dat)", hint="pass llama-imatrix's file")
    data: dict[str, Any] = {}
    for _ in range(n_entries):
        length = int(take("<i4")[0])
        if length < 1 or length > 4096:
            raise UsageError(f"{path}: corrupt legacy imatrix (entry name length {length})")
        name = take("u1", length).tobytes().decode("utf-8", "replace")
        ncall = int(take("<i4")[0])
        nval = int(take("<i4")[0])
        if nval < 1:
            raise UsageError(f"{path}: corrupt legacy imatrix (entry {name} has {nval} values)")
        sums = take("<f4", nval).astype(np.float32)
        data[name] = np.ascontiguousarray(sums / ncall if ncall > 0 else sums)
    info: dict[str, Any] = {"datasets": [], "chunk_count": 0, "chunk_size": 0, "legacy": True}
    if pos + 4 <= len(raw):
        info["chunk_count"] = int(take("<i4")[0])
        if pos + 4 <= len(raw):
            length = int(take("<i4")[0])
            if 0 < length <= len(raw) - pos:
                info["datasets"] = [take("u1", length).tobytes().decode("utf-8", "replace")]
    return data, info


@dataclass
class ImatrixData:
    """An imatrix in the form ``llama_model_quantize`` takes, with the buffers it points into kept alive.

    Keep this object referenced until ``llama_model_quantize`` has returned.

    Attributes:
        path: the file it was read from.
        sha256: the file's SHA-256 (for the manifest).
        entries: tensor name → number of values.
        datasets, chunk_count, chunk_size: the file's metadata (as llama-imatrix recorded it).
        array: a ctypes array of ``llama_cpp.llama_model_imatrix_data``, ended by an all-null entry.
        kv_overrides: a ctypes array of ``llama_cpp.llama_model_kv_override`` writing the ``quantize.imatrix.*``
            metadata keys into the output, as ``llama-quantize`` does, ended by an empty key.
    """

    path: Path
    sha256: str
    entries: dict[str, int]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    array: Any
    kv_overrides: Any
    _keepalive: list[Any] = field(default_factory=list, repr=False)

    @property
    def pointer(self) -> Any:
        """``array`` as the ``POINTER(llama_model_imatrix_data)`` that ``params.imatrix`` takes."""
        import llama_cpp

        return ctypes.cast(self.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))

    def apply(self, params: Any, *, metadata: bool = True) -> None:
        """Point ``params.imatrix`` (and, with ``metadata``, ``params.kv_overrides``) at this data.

        ``params`` is a ``llama_cpp.llama_model_quantize_params``. With ``metadata`` false, existing
        ``kv_overrides`` are left alone.
        """
        import llama_cpp

        params.imatrix = self.pointer
        if metadata:
            params.kv_overrides = ctypes.cast(self.kv_overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this imatrix (``source`` is added by the caller)."""
        return {"file": self.path.name, "sha256": self.sha256, "entries": len(self.entries)}


def load_for_quantize(path: Path) -> ImatrixData:
    """Read an imatrix file (GGUF or legacy) and build the ctypes structures ``llama_model_quantize`` takes.

    Usage in a quantize worker::

        imx = imatrix.load_for_quantize(path)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ...
        imx.apply(params)
        rc = llama_cpp.llama_model_quantize(src, dst, ctypes.byref(params))  # imx stays referenced until here

    Raises:
        UsageError: the file is missing or not an imatrix.
        ToolNotFound: llama-cpp-python is not installed.
    """
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        raise ToolNotFound(
            "llama-cpp-python is needed to quantize with an imatrix",
            hint="pip install 'cecai-converter[local]'",
        ) from None
    path = Path(path)
    data, info = read_imatrix(path)
    keep: list[Any] = []
    entry_t = llama_cpp.llama_model_imatrix_data
    array: Any = (entry_t * (len(data) + 1))()  # ctypes fields: llama_cpp's annotations do not fit them
    for i, (name, values) in enumerate(sorted(data.items())):
        buf = np.ascontiguousarray(values, dtype=np.float32)
        cname = ctypes.create_string_buffer(name.encode("utf-8"))
        keep += [buf, cname]
        array[i].name = ctypes.cast(cname, ctypes.c_char_p)
        array[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = buf.size
    # array[len(data)] stays zeroed: name == NULL ends the list (llama-quant.cpp)

    kv_t = llama_cpp.llama_model_kv_override
    kvs: list[tuple[bytes, int, Any]] = [(_KV_FILE, _KV_TAG_STR, path.name.encode("utf-8")[:127])]
    if info["datasets"]:
        kvs.append((_KV_DATASET, _KV_TAG_STR, str(info["datasets"][0]).encode("utf-8")[:127]))
    kvs.append((_KV_N_ENTRIES, _KV_TAG_INT, len(data)))
    if info["chunk_count"] > 0:
        kvs.append((_KV_N_CHUNKS, _KV_TAG_INT, int(info["chunk_count"])))
    overrides: Any = (kv_t * (len(kvs) + 1))()
    for i, (key, tag, value) in enumerate(kvs):
        overrides[i].key = key
        overrides[i].tag = tag
        if tag == _KV_TAG_STR:
            overrides[i].value.val_str = value
        else:
            overrides[i].value.val_i64 = value
    # overrides[len(kvs)].key[0] == 0 ends the list

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return ImatrixData(
        path=path,
        sha256=digest.hexdigest(),
        entries={name: int(values.size) for name, values in data.items()},
        datasets=list(info["datasets"]),
        chunk_count=int(info["chunk_count"]),
        chunk_size=int(info["chunk_size"]),
        array=array,
        kv_overrides=overrides,
        _keepalive=keep,
    )
