"""The source side's worker (``python -m cecai_converter.source_parity.source_worker``, started by
:meth:`~cecai_converter.source_parity.compare.SourceCheck.start` beside the converter): transformers loads the source's
tokenizer (the corpus, the added tokens and the evaluation text split into ids; the templates rendered), writes those
results to the work folder at once, then loads the model and saves its float32 logits there. A separate process:
torch's memory is released when it ends, and a crash is a clean error."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..processes import serve_job
from .logits import SOURCE_LOGITS
from .source_folder import needs_remote_code, read_json
from .tokenizer import EARLY_FILE, SPECIAL_SAMPLE

#: A text around each added token, to see it recognised inside text and not only alone.
_EMBED: Final = ("Hi {}", "a{}b")


def _source_worker(job: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' side: tokenizer, templates, and the forward pass (logits written to the work folder)."""
    import numpy as np

    folder = Path(job["source"])
    trust = bool(job["trust_remote_code"])
    out: dict[str, Any] = {}
    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))
    tok = _load_tokenizer(folder, trust, out)
    tokens: list[int] | None = None
    if tok is not None:
        strings = list(job["strings"])
        added = _added_strings(tok)
        out["added_strings"] = added
        text = Path(job["text"]).read_text(encoding="utf-8")
        out["eval_text"] = text
        out["encodings"] = [list(tok.encode(s, add_special_tokens=False)) for s in [*strings, *added, text]]
        out["with_special"] = list(tok.encode(SPECIAL_SAMPLE, add_special_tokens=True))
        out["sample_plain"] = list(tok.encode(SPECIAL_SAMPLE, add_special_tokens=False))
        out["bos_id"], out["eos_id"] = tok.bos_token_id, tok.eos_token_id
        template = getattr(tok, "chat_template", None)
        out["chat_template"] = template if isinstance(template, (str, dict, list)) else None
        out["renders"] = _render_transformers(tok, job["conversations"], out["chat_template"])
        tokens = list(tok.encode(text, add_special_tokens=True))[: int(job["n_tokens"])]
        out["eval_tokens"] = tokens
    else:
        out["file_chat_template"] = read_json(folder / "tokenizer_config.json").get("chat_template")
        out["logits_reason"] = "the source's tokenizer could not be loaded, so the same tokens cannot be fed to both"
    # What the GGUF side needs, before the model is loaded: the parent starts that side with it as soon as the base
    # is written, and the two evaluate the tokens at the same time (written whole, then renamed into place).
    early = Path(job["work"]) / EARLY_FILE
    early.with_suffix(".part").write_text(json.dumps(out), encoding="utf-8")
    os.replace(early.with_suffix(".part"), early)
    if job["logits"] and tokens is not None:
        logits = _source_logits(folder, trust, job.get("remote_class"), tokens, out)
        if logits is not None:
            np.save(Path(job["work"]) / SOURCE_LOGITS, logits)
            out["n_vocab"] = int(logits.shape[1])
    return out


def _load_tokenizer(folder: Path, trust: bool, out: dict[str, Any]) -> Any:
    remote = needs_remote_code(read_json(folder / "tokenizer_config.json"), "AutoTokenizer")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust)
    except Exception as exc:  # any failure to load is recorded as the reason, not raised
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if remote and not trust:
            why = f"the tokenizer needs the repository's own code ({remote}); --trust-remote-code allows it ({why})"
        out["tokenizer_error"] = f"transformers could not load the source's tokenizer: {why}"
        return None


def _added_strings(tok: Any) -> list[str]:
    """Every added and special token of the source, alone and inside text."""
    contents: set[str] = set()
    for value in getattr(tok, "added_tokens_decoder", {}).values():
        contents.add(str(getattr(value, "content", value)))
    contents.update(str(t) for t in getattr(tok, "all_special_tokens", []) or [])
    contents.discard("")
    ordered = sorted(contents)
    return [*ordered, *(form.format(t) for t in ordered for form in _EMBED)]


def _render_transformers(tok: Any, conversations: Mapping[str, Any], template: object) -> dict[str, Any]:
    renders: dict[str, Any] = {}
    if template is None:
        return renders
    for name, conv in conversations.items():
        if conv["tools"] is not None and "tool" not in json.dumps(template):
            continue
        try:
            text = tok.apply_chat_template(
                conv["messages"], tools=conv["tools"], tokenize=False, add_generation_prompt=True
            )
            renders[name] = {"text": str(text)}
        except Exception as exc:  # a template that raises is recorded, not a failure of the check
            renders[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return renders


def _source_logits(folder: Path, trust: bool, remote: str | None, tokens: list[int], out: dict[str, Any]) -> Any:
    """transformers' float32 logits for ``tokens`` (positions × vocabulary), or None with ``logits_reason`` set."""
    import torch
    import transformers

    config = read_json(folder / "config.json")
    native = _native_class(transformers, config)
    if remote and not trust and native is None:
        out["logits_reason"] = (
            f"the model needs the repository's own code ({remote}) and --trust-remote-code (TRUST_REMOTE_CODE) was "
            "not given: it was not run"
        )
        return None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, trust_remote_code=trust
        )
    except Exception as exc:  # transformers cannot build this model: recorded, the rest is still compared
        first = str(exc).splitlines()[0] if str(exc) else ""
        out["logits_reason"] = (
            f"transformers {transformers.__version__} could not load the source model: {type(exc).__name__}: {first}"
        )[:400]
        return None
    with torch.inference_mode():  # from_pretrained returns the model in eval mode (no dropout)
        logits = model(torch.tensor([tokens], dtype=torch.long)).logits[0].float().numpy()
    return logits


def _native_class(transformers: Any, config: Mapping[str, Any]) -> str | None:
    """The transformers class this config's model type maps to without the repository's code, if any."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type", "")))
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return name if isinstance(name, str) and hasattr(transformers, name) else None


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(serve_job(_source_worker))
