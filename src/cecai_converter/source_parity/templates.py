"""The chat templates compared: the GGUF's ``tokenizer.chat_template`` (and named ones) against the source's, and the
conversations both sides render them with (:func:`conversations`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from .tokenizer import shown_text

#: The conversation every template is rendered with; the tool conversation only where the template mentions tools.
CONVERSATION: Final = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Japan?"},
)
TOOLS: Final = (
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "the city"}},
                "required": ["city"],
            },
        },
    },
)
TOOL_CONVERSATION: Final = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22 degrees, sunny"},
)


def conversations() -> dict[str, dict[str, Any]]:
    """The conversations both workers render, by name, as their jobs carry them (JSON)."""
    return {
        "chat": {"messages": [dict(m) for m in CONVERSATION], "tools": None},
        "tool call": {"messages": json.loads(json.dumps(TOOL_CONVERSATION)), "tools": json.loads(json.dumps(TOOLS))},
    }


def gguf_templates(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The GGUF's chat templates by name (``default`` for ``tokenizer.chat_template``)."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if key == "tokenizer.chat_template" and isinstance(value, str):
            out["default"] = value
        elif key.startswith("tokenizer.chat_template.") and isinstance(value, str):
            out[key.removeprefix("tokenizer.chat_template.")] = value
    return out


def _source_templates(value: object) -> dict[str, str]:
    """transformers' ``chat_template`` (a string, a name → template mapping, or a list of {name, template}) by name,
    named as the converter names them in the GGUF (``tokenizer.chat_template.<name>``, other characters as ``_``)."""
    if isinstance(value, str):
        return {"default": value}
    pairs: list[tuple[object, object]] = []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = [(c.get("name"), c.get("template")) for c in value if isinstance(c, Mapping)]
    return {re.sub(r"[^A-Za-z0-9]", "_", str(n)): t for n, t in pairs if isinstance(t, str) and n}


def compare_templates(
    src: Mapping[str, Any], ggf: Mapping[str, Any], in_gguf: Mapping[str, str], failures: list[str]
) -> dict[str, Any]:
    """The record's ``chat_template`` section: the templates and their renders compared; each difference appended to
    ``failures``."""
    in_source = _source_templates(src.get("chat_template"))
    if src.get("tokenizer_error") and not in_source:
        in_source = _source_templates(src.get("file_chat_template"))
    names = sorted(set(in_source) | set(in_gguf))
    if not names:
        return {"status": "none", "names": [], "renders": {}}
    statuses: dict[str, str] = {}
    for name in names:
        if name not in in_gguf:
            statuses[name] = "missing from the GGUF"
        elif name not in in_source:
            statuses[name] = "only in the GGUF"
        else:
            statuses[name] = "equal" if in_source[name] == in_gguf[name] else "different"
    for name, status in statuses.items():
        key = "tokenizer.chat_template" + ("" if name == "default" else f".{name}")
        if status != "equal":
            failures.append(f"the chat template {key} is {status}" + (" from the source's" if status == "different"
                                                                          else ""))  # fmt: skip
    renders: dict[str, str] = {}
    for conversation, theirs in (ggf.get("renders") or {}).items():
        mine = (src.get("renders") or {}).get(conversation)
        if mine is None:
            continue
        if "error" in mine or "error" in theirs:
            who = [w for w, r in (("transformers", mine), ("the runtime", theirs)) if "error" in r]
            renders[conversation] = (
                "not rendered by "
                + " nor ".join(who)
                + ": "
                + str((mine if "error" in mine else theirs)["error"])[:200]
            )
            continue
        same = mine["text"] == theirs["text"]
        renders[conversation] = "equal" if same else "different"
        if not same:
            at = next((i for i, (a, b) in enumerate(zip(mine["text"], theirs["text"], strict=False)) if a != b), None)
            at = min(len(mine["text"]), len(theirs["text"])) if at is None else at
            start = max(0, at - 10)
            failures.append(
                f"the {conversation} conversation renders differently from character {at}: transformers "
                f"{shown_text(mine['text'][start:])}, the runtime {shown_text(theirs['text'][start:])}"
            )
    overall = (
        "equal" if all(s == "equal" for s in statuses.values()) else next(s for s in statuses.values() if s != "equal")
    )
    return {"status": overall, "names": names, "templates": statuses, "renders": renders}
