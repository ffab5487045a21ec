"""The one escaper for values from records (manifests, check records, option values) put into Markdown.

The model card, the release notes, the job summary and ``report`` all render values that come from files someone
else may have written: a file name, a precision, a check's problem text, a runtime's machine name. GitHub and the
Hugging Face Hub render Markdown with inline HTML, links and math, so such a value must be shown, never rendered:

* :func:`inline` — text on one line or in a table cell: control characters and line breaks become spaces (no new
  block, no extra table row); every character that starts Markdown or HTML (`````, ``*``, ``_``, ``[``, ``]``,
  ``<``, ``>``, ``&``, ``|``, ``#``, ``~``, ``$``, ``\\``) is backslash-escaped, and so is a leading
  list or heading marker (``-``, ``+``, ``=``, ``1.``), so the value cannot open a link, a tag, an entity, a code
  span, a math span or a table column;
* :func:`code` — a value as a code span: delimited by a run of backticks longer than any in the value, so it cannot
  close the span early; ``|`` escaped when it sits in a table cell (GitHub splits cells before parsing spans);
* :func:`code_block` — a fenced block whose fence is longer than any backtick run in the text, so a line of
  backticks inside cannot end it.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["code", "code_block", "inline"]

#: Line and paragraph breaks, control and format characters: each becomes a space, so a value stays on its line.
_BREAKS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
#: ASCII punctuation that starts inline Markdown, HTML, math or a table cell anywhere in a line; ``_`` only where it
#: can open or close emphasis (not between two letters or digits: ``Q4_K_M`` stays as it is).
_SPECIAL: Final = re.compile(r"([\\`*\[\]<>&|#~$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
#: At the start of a value: what would open a list item, a setext heading or an ordered list.
_LEADING: Final = re.compile(r"^([-+=])|^(\d{1,9})([.)])")
_TICKS: Final = re.compile(r"`+")


def _one_line(value: object) -> str:
    return " ".join(_BREAKS.sub(" ", str(value)).split())


def inline(value: object, *, limit: int | None = None) -> str:
    """``value`` as Markdown text that renders as exactly these characters, on one line (also safe in a table cell).

    Args:
        value: anything; it is shown through ``str``.
        limit: cut the text to this many characters (before escaping, so no escape is cut in half), marked ``…``.
    """
    text = _one_line(value)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    text = _SPECIAL.sub(r"\\\1", text)
    return _LEADING.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", text)


def code(value: object, *, cell: bool = False) -> str:
    """``value`` as a one-line code span (empty for an empty value).

    Args:
        value: anything; it is shown through ``str``, line breaks and control characters as spaces.
        cell: the span sits in a table cell: ``|`` is escaped as ``\\|`` (GitHub's tables split cells on an
            unescaped ``|`` even inside a code span, and remove the backslash before the span is rendered).
    """
    text = _one_line(value)
    if not text:
        return ""
    fence = "`" * (max((len(run) for run in _TICKS.findall(text)), default=0) + 1)
    if text.startswith("`") or text.endswith("`"):
        text = f" {text} "  # the padding a code span strips, so a backtick at either end stays content
    if cell:
        text = text.replace("|", "\\|")
    return f"{fence}{text}{fence}"


def code_block(text: str, info: str = "") -> list[str]:
    """Markdown lines of a fenced code block holding ``text`` verbatim (control characters but tabs as spaces).

    The fence is a run of backticks longer than any run in ``text`` (at least three), so no line of ``text`` closes
    it; ``info`` (the language) must be a plain word.
    """
    body = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]", " ", text)
    fence = "`" * max(3, max((len(run) for run in _TICKS.findall(body)), default=0) + 1)
    word = info if re.fullmatch(r"[A-Za-z0-9_+-]*", info) else ""
    return [f"{fence}{word}", *body.splitlines(), fence]
