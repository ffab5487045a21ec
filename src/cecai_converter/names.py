"""Names that come from users and end up as file names, and values that end up in messages.

Every entry point that lets a user choose the stem of the output files (``MODEL_NAME`` in the Converter
configuration, ``convert --model-name`` and the name derived from a folder or repo id, ``name:`` in a batch file, the
action's ``model-name`` input) goes through :func:`check_stem`, so there is one rule:

* letters, digits, ``.``, ``_`` and ``-``, starting with a letter or a digit, at most :data:`MAX_STEM` characters
  (the rule of Hugging Face repository names, so a repo's own name is always a valid stem);
* hence never a path (no ``/`` or ``\\``), never hidden (``.``, ``..``, ``.x``), never a control character, and
  always a name GitHub keeps unchanged as a release asset (it rewrites spaces and other characters, which would break
  the match with ``manifest.json`` and ``SHA256SUMS``).

:func:`show` renders any value for an error message in bounded space: a YAML "billion laughs" value is a few shared
lists in memory, but its full ``repr`` is gigabytes.
"""

from __future__ import annotations

import re
import reprlib
import unicodedata
from typing import Final

from .errors import UsageError

__all__ = ["MAX_STEM", "check_plain_name", "check_stem", "control_character", "show"]

#: The longest stem: Hugging Face's limit for a repository name. With the longest suffix
#: (``.<precision>.gguf``, ``.<pair slug>.manifest.json``) a file name stays far below 255 bytes.
MAX_STEM: Final = 96
_STEM: Final = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_STEM - 1}}}")
_STEM_HINT: Final = (
    f"use letters, digits, '.', '_' and '-', starting with a letter or digit, at most {MAX_STEM} characters "
    "(no '/', no spaces)"
)

_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4


def show(value: object) -> str:
    """A short ``repr`` of ``value`` for a message: at most a few hundred characters, whatever its size."""
    return _repr.repr(value)


def control_character(value: str) -> str | None:
    """The first control, format or line/paragraph-separator character in ``value`` (as ``U+XXXX``), or None.

    These are what can end a line of a log or inject a workflow command (``\\n::warning::…``) or hide text.
    """
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            return f"U+{ord(char):04X}"
    return None


def check_stem(value: object, where: str, *, error: type[UsageError] = UsageError) -> str:
    """Return ``value`` if it is a valid stem for output file names, else raise ``error`` naming ``where``.

    Args:
        value: the candidate (any type: it may come straight from YAML or JSON).
        where: what the user wrote it in, for the message (``MODEL_NAME in …/converter_args.yaml``,
            ``--model-name``, ``conversions.yaml: models[0].name``).
        error: the error type (:class:`~cecai_converter.errors.ConfigError` for configuration files); exit code 2.
    """
    if not isinstance(value, str):
        raise error(f"{where}: expected a name (a string), got {show(value)}", hint=_STEM_HINT)
    if not _STEM.fullmatch(value):
        if not value:
            why = "it is empty"
        elif value in (".", ".."):
            why = "it names a folder, and the files would be hidden"
        elif "/" in value or "\\" in value:
            why = "it is a path, and the files would be written outside the outputs folder"
        elif control_character(value):
            why = f"it holds the control character {control_character(value)}"
        elif len(value) > MAX_STEM:
            why = f"it is longer than {MAX_STEM} characters"
        else:
            why = "it holds characters other than letters, digits, '.', '_' and '-', or does not start with one"
        raise error(
            f"{where}: {show(value)} cannot be a file name stem (every output file is named <stem>.<type>.gguf): {why}",
            hint=_STEM_HINT,
        )
    return value


def check_plain_name(value: object) -> str | None:
    """Why ``value`` is not a plain file name (one path component, not hidden-relative, no control characters), or
    None when it is one. Used for file names read from files (a manifest's ``files[].name``, an index's shards)."""
    if not isinstance(value, str) or not value:
        return f"expected a file name, got {show(value)}"
    if "/" in value or "\\" in value or value in (".", ".."):
        return f"{show(value)} is a path, not a file name in the same folder"
    if control_character(value):
        return f"{show(value)} holds a control character"
    return None
