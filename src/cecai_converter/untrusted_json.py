"""The one bounded reader for JSON that someone else wrote.

Every JSON document that comes from a user, a file a user hands us, an environment variable or another machine
(``reference.json``, check records, ``manifest.json``, ``--request`` / ``CECAI_REQUEST``, ``--thresholds``, the
publish action's expected checks) is read through :func:`loads_bounded` or :func:`load_bounded_file`, so every
refusal looks the same and names what was read:

* the size is checked **before** anything is decoded or parsed (a file is never read past its bound, and a FIFO or
  a device is refused instead of read forever);
* the nesting depth is checked **without recursion**, before :func:`json.loads` is called: Python's parser recurses
  once per ``[`` or ``{`` and raises ``RecursionError`` (a traceback) on ``[[[[…`` a few thousand deep;
* ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's parser accepts although JSON has no such values) are
  refused unless the caller allows them;
* every parse failure (``ValueError`` including a too-long integer, ``UnicodeDecodeError``, ``RecursionError``)
  becomes the caller's :class:`~cecai_converter.errors.ConverterError` kind (exit 2 for the input kinds), with the
  position and a hint.

JSON written by our own worker processes for their parent is not untrusted input and is read directly.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Final, NoReturn

from .errors import ConverterError, UsageError

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_DEPTH", "load_bounded_file", "loads_bounded", "nesting_depth"]

#: The default size bound: far above any document this tool writes for a handful of models.
DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024
#: The default depth bound: our deepest document (a manifest) nests 5 levels.
DEFAULT_MAX_DEPTH: Final = 64

# A complete JSON string: no backtracking blow-up (the alternatives cannot match the same character).
_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
# Brackets summed per block: a few megabytes of scratch memory at most.
_BLOCK: Final = 1 << 20
# A surrogate written as an escape: only then can a parsed string hold a lone surrogate (not encodable as UTF-8).
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse(error: type[ConverterError], what: str, reason: str, hint: str | None) -> NoReturn:
    raise error(f"{what}: {reason}", hint=hint or "give a well-formed JSON document as this tool writes it")


def nesting_depth(text: str, limit: int | None = None) -> int:
    """The deepest nesting of ``[`` / ``{`` in ``text``, brackets inside strings not counted; no recursion.

    Strings are cut out and everything but the brackets dropped (regular expressions), then the running depth is a
    cumulative sum over the brackets, in blocks (numpy): linear, bounded memory, and no Python loop per character,
    whatever the document's size or shape. An unterminated string ends the scan (the parser says where).

    Args:
        text: the document.
        limit: stop at the first block that goes deeper than this (a deep document costs one block).
    """
    import numpy as np

    outside = _STRING.sub("", text)
    quote = outside.find('"')
    if quote >= 0:
        outside = outside[:quote]
    codes = np.frombuffer(_NOT_BRACKET.sub("", outside).encode("ascii"), dtype=np.uint8)
    steps = np.zeros(256, dtype=np.int8)
    steps[[ord("["), ord("{")]] = 1
    steps[[ord("]"), ord("}")]] = -1
    level = deepest = 0
    for start in range(0, len(codes), _BLOCK):
        running = np.cumsum(steps[codes[start : start + _BLOCK]], dtype=np.int64) + level
        deepest, level = max(deepest, int(running.max())), int(running[-1])
        if limit is not None and deepest > limit:
            break
    return deepest


def _reject_constant(name: str) -> NoReturn:
    # json.loads calls this for NaN, Infinity and -Infinity; a ValueError is reported with the rest below.
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # "1e999" is JSON and parses as infinity: as much a non-number as Infinity itself.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of a number's range")
    return value


def loads_bounded(
    text: str | bytes,
    *,
    what: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    allow_nan: bool = False,
    error: type[ConverterError] = UsageError,
    hint: str | None = None,
) -> Any:
    """Parse JSON someone else wrote, within bounds, or raise ``error`` naming ``what``.

    Args:
        text: the document (bytes must be UTF-8).
        what: what it is, for the message: a file path, ``CECAI_REQUEST``, ``--thresholds``.
        max_bytes: the largest document accepted, in bytes (UTF-8).
        max_depth: the deepest nesting of arrays and objects accepted.
        allow_nan: accept ``NaN`` / ``Infinity`` / ``-Infinity`` and numbers past a float's range such as ``1e999``
            (refused by default: not JSON numbers, or not finite).
        error: the kind to raise (``UsageError``, ``ConfigError``, ``ManifestError`` …; exit 2 for those).
        hint: the hint of the error; a generic one when None.

    Returns:
        The parsed value (any JSON type: callers check the shape).

    Raises:
        error: too large, too deep, not UTF-8, not JSON, or holding a non-JSON constant.
    """
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        _refuse(error, what, f"{size:,} bytes of JSON, more than the {max_bytes:,} accepted", hint)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            _refuse(error, what, f"not UTF-8 (byte {exc.start})", hint)
    depth = nesting_depth(text, max_depth)
    if depth > max_depth:
        _refuse(error, what, f"JSON nested more than {max_depth} levels deep", hint)
    try:
        if allow_nan:
            value = json.loads(text)
        else:
            value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        _refuse(error, what, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", hint)
    except ValueError as exc:
        if "digits" in str(exc):  # int("9" * 5000): Python's int_max_str_digits limit
            _refuse(error, what, "a number with more digits than this tool reads (4,300)", hint)
        _refuse(error, what, f"not valid JSON ({exc})", hint)
    except RecursionError:  # only if the interpreter's recursion limit is set far below max_depth
        _refuse(error, what, f"JSON nested too deep for this interpreter (at most {depth} levels)", hint)
    if _SURROGATE_ESCAPE.search(text):
        # A lone surrogate cannot be written to a terminal, a log or a UTF-8 file later on: refuse it here.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            _refuse(error, what, "a string holds an unpaired UTF-16 surrogate (\\uD800-\\uDFFF)", hint)
    return value


def load_bounded_file(
    path: Path,
    *,
    what: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    allow_nan: bool = False,
    error: type[ConverterError] = UsageError,
    hint: str | None = None,
    missing_hint: str | None = None,
    raise_missing: bool = False,
) -> Any:
    """Read and parse a JSON file someone else wrote, within bounds (see :func:`loads_bounded`).

    The file must be a regular file (a FIFO or a device is refused, not read); it is never read past
    ``max_bytes`` + 1 bytes, whatever its size.

    Args:
        path: the file.
        what: what it is, for the message; default the path.
        max_bytes, max_depth, allow_nan, error, hint: as for :func:`loads_bounded`.
        missing_hint: the hint when the file does not exist (default ``hint``).
        raise_missing: let ``FileNotFoundError`` through (for readers where "no file" is an answer).

    Raises:
        error: missing, not a regular file, unreadable, too large, too deep or not JSON.
        FileNotFoundError: no file at ``path``, with ``raise_missing``.
    """
    label = what or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if raise_missing:
            raise
        raise error(f"{label}: no such file", hint=missing_hint or hint) from None
    except OSError as exc:
        _refuse(error, label, f"cannot be opened ({exc.strerror or exc})", hint)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            _refuse(error, label, "not a regular file", hint)
        if info.st_size > max_bytes:
            _refuse(error, label, f"{info.st_size:,} bytes, more than the {max_bytes:,} accepted", hint)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        _refuse(error, label, f"cannot be read ({exc.strerror or exc})", hint)
    finally:
        os.close(fd)
    return loads_bounded(
        raw, what=label, max_bytes=max_bytes, max_depth=max_depth, allow_nan=allow_nan, error=error, hint=hint
    )
