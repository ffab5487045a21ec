"""The tokenizers compared: the shipped corpus, every added and special token, the evaluation text, split into ids by
both sides; the BOS and EOS ids and what each side adds around a text."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Final

from ..names import show

#: The shipped tokenizer corpus (``data/parity_corpus.json``).
CORPUS: Final = "parity_corpus.json"
#: A text that shows what each side adds around a text when asked to (BOS, EOS).
SPECIAL_SAMPLE: Final = "Hello world"
_SHOWN_IDS: Final = 24
_SHOWN_CHARS: Final = 60
#: In the work folder: the source worker's tokenizer results (written before it loads the model).
EARLY_FILE: Final = "source-tokenizer.json"


def corpus_strings() -> list[str]:
    """The shipped tokenizer corpus."""
    data = json.loads((resources.files("cecai_converter") / "data" / CORPUS).read_text(encoding="utf-8"))
    return [str(s) for s in data["strings"]]


def shown(ids: Sequence[int]) -> str:
    """Token ids for a message: the first few, then an ellipsis."""
    head = ", ".join(str(i) for i in ids[:_SHOWN_IDS])
    return f"[{head}{', …' if len(ids) > _SHOWN_IDS else ''}]"


def shown_text(text: str) -> str:
    """A text for a message: quoted, cut after a few dozen characters."""
    return show(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…")


def compare_tokenizers(
    src: Mapping[str, Any], ggf: Mapping[str, Any], strings: Sequence[str], failures: list[str]
) -> dict[str, Any]:
    """The record's ``tokenizer`` section from both sides' results; each difference appended to ``failures``."""
    if src.get("tokenizer_error"):
        return {"status": "skipped", "reason": str(src["tokenizer_error"])}
    ours, theirs = src["encodings"], ggf["encodings"]
    known = set(ggf.get("space_prefix_only") or [])
    differing = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if list(a) != list(b)]
    record: dict[str, Any] = {
        "status": "compared",
        "n_strings": len(strings),
        "n_differing": len([i for i in differing if i not in known]),
        "n_space_prefix": len(known),
        "first_difference": None,
        "bos": {"source": src.get("bos_id"), "gguf": ggf.get("bos_id")},
        "eos": {"source": src.get("eos_id"), "gguf": ggf.get("eos_id")},
        "add_special": {"text": SPECIAL_SAMPLE, "source": src.get("with_special"), "gguf": ggf.get("with_special")},
    }
    real = [i for i in differing if i not in known]
    if known:
        i = min(known)
        record["space_prefix_example"] = {"text": strings[i], "source": list(ours[i]), "gguf": list(theirs[i])}
    if real:
        i = real[0]
        record["first_difference"] = {"text": strings[i], "source": list(ours[i]), "gguf": list(theirs[i])}
        failures.append(
            f"the GGUF's tokenizer differs from the source's on {len(real)} of {len(strings)} strings; first: "
            f"{shown_text(strings[i])} source {shown(ours[i])} gguf {shown(theirs[i])}"
        )
    for which in ("bos", "eos"):
        mine, gguf_id = src.get(f"{which}_id"), ggf.get(f"{which}_id")
        if mine is not None and mine != gguf_id:
            failures.append(f"the {which.upper()} token differs: source id {mine}, GGUF id {gguf_id}")
    added_src, added_gguf = list(src.get("with_special") or []), list(ggf.get("with_special") or [])
    plain_src, plain_gguf = src.get("sample_plain") or [], ggf.get("sample_plain") or []
    extra_src = _added_around(added_src, plain_src)
    extra_gguf = _added_around(added_gguf, plain_gguf)
    record["add_special"]["equal"] = extra_src == extra_gguf
    if extra_src != extra_gguf:
        failures.append(
            f"the special tokens added around a text differ: source adds {_describe_added(extra_src)}, the GGUF "
            f"adds {_describe_added(extra_gguf)} (add_bos/add_eos)"
        )
    return record


def _added_around(with_special: Sequence[int], plain: Sequence[int]) -> tuple[list[int], list[int]]:
    """The ids added before and after ``plain`` in ``with_special`` (BOS/EOS), when it contains ``plain``."""
    n = len(plain)
    for start in range(len(with_special) - n + 1):
        if list(with_special[start : start + n]) == list(plain):
            return list(with_special[:start]), list(with_special[start + n :])
    return list(with_special), []


def _describe_added(added: tuple[list[int], list[int]]) -> str:
    before, after = added
    parts = ([f"{shown(before)} before"] if before else []) + ([f"{shown(after)} after"] if after else [])
    return " and ".join(parts) or "nothing"
