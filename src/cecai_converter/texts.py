"""The user's texts (``EVAL_TEXT``, ``CALIBRATION_TEXT``): checked with the configuration, bounded in the work.

Both texts are read by llama.cpp only after the model is converted (the imatrix after the base, fidelity after
quantizing and verifying). A missing, binary or empty file found then costs the whole conversion and reads as a
problem of the model; so :func:`check_text_file` runs when the options are resolved, before any work, and checks
what needs no tokenizer: the file exists and is a regular file, at most :data:`MAX_TEXT_BYTES`, valid UTF-8 text
(no NUL or other control characters but tab and line breaks), and long enough for the tokens it must give (a token
is at least one byte, so ``n`` tokens need ``n - 1`` bytes besides the BOS token). The exact count needs the
model's tokenizer and stays where the model is at hand.

:data:`MAX_TEXT_TOKENS` bounds the work a text can cause, whatever its size: fidelity scores at most that many
tokens, the imatrix at most that many tokens' worth of chunks.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Final

from .errors import UsageError
from .names import show

__all__ = ["MAX_TEXT_BYTES", "MAX_TEXT_TOKENS", "TEXT_VARIABLES", "check_text_file"]

#: The largest text accepted: several times any text fidelity or an imatrix needs (wikitext-2's test set is 1.3 MB).
MAX_TEXT_BYTES: Final = 16 * 1024 * 1024
#: The most tokens of a text that fidelity scores, and the imatrix's chunks cover.
MAX_TEXT_TOKENS: Final = 65_536
#: The options that name such a text → the fewest tokens each needs (fidelity: two chunks of 32 tokens; imatrix:
#: two chunks of its context, 512 tokens).
TEXT_VARIABLES: Final = {"eval_text": 64, "calibration_text": 1024}
#: Control characters no prose holds: NUL and the C0/C1 controls but tab, LF, VT, FF and CR.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def check_text_file(path: Path, where: str, *, min_tokens: int, error: type[UsageError] = UsageError) -> Path:
    """Return ``path`` if it can be the text ``where`` names, else raise ``error`` naming ``where`` and the file.

    Args:
        path: the text (already resolved against its folder).
        where: how the user gave it (``EVAL_TEXT in …/converter_args.yaml``, ``--eval-text``).
        min_tokens: the fewest tokens the text must give (a cheap lower bound is checked: bytes ≥ tokens - 1).
        error: :class:`~cecai_converter.errors.ConfigError` for a configuration file (both exit 2).
    """
    hint = "give a UTF-8 text file (prose like the model's use), or remove the setting to use the shipped text"
    try:
        # Opened without blocking and checked on the descriptor: a FIFO would block an open for reading.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{where}: {path} does not exist", hint=hint) from None
    except OSError as exc:
        raise error(f"{where}: {path} cannot be read: {exc.strerror}", hint=hint) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise error(f"{where}: {path} is not a regular file (a folder, FIFO or device)", hint=hint)
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > MAX_TEXT_BYTES:
            raise error(
                f"{where}: {path} is {info.st_size:,} bytes, more than the {MAX_TEXT_BYTES:,} a text may have",
                hint=f"at most {MAX_TEXT_TOKENS:,} tokens of it would be used: give a shorter excerpt",
            )
        raw = fh.read(MAX_TEXT_BYTES + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: {path} is not UTF-8 text (byte {exc.start}: {show(raw[exc.start : exc.start + 4])})",
                    hint=hint) from None  # fmt: skip
    bad = _CONTROL.search(text)
    if bad is not None:
        raise error(
            f"{where}: {path} holds the control character U+{ord(bad[0]):04X} at character {bad.start()}: "
            "it is binary data, not text",
            hint=hint,
        )
    if len(raw) + 1 < min_tokens or not text.strip():
        raise error(
            f"{where}: {path} has {len(raw)} bytes of text; it must give at least {min_tokens} tokens, and a token "
            "is at least one byte",
            hint="use a longer text (a few thousand words), or remove the setting to use the shipped text",
        )
    return path
