"""The manifest's ``source_parity`` record (:class:`SourceParity`): its JSON form, its validation
(:func:`record_problem`), the record of a comparison that did not run (:func:`not_checked`) and its one-line
:func:`summary` for reports, cards and job summaries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SourceParity:
    """The manifest's ``source_parity`` record: what was compared between the base GGUF and its source.

    Attributes:
        checked: whether the comparison ran (False: turned off, or not possible; ``skipped_reason`` says why).
        skipped_reason: why it did not run.
        passed: True when nothing differs beyond the limits; None when not checked.
        failures: one message per difference found, naming it.
        base: the GGUF file compared (its name).
        tokenizer: ``status`` (compared | skipped), ``reason``, ``n_strings``, ``n_differing``,
            ``first_difference`` ({text, source, gguf}), ``bos``/``eos`` ({source, gguf}), ``add_special``
            ({text, source, gguf, equal}).
        chat_template: ``status`` (none | equal | different | missing from the GGUF | only in the GGUF),
            ``names`` compared, ``renders``: conversation → equal | different | not rendered by … .
        hyperparameters: ``compared`` (their names) and ``differing`` ([{name, source_key, gguf_key, source, gguf}]).
        logits: ``status`` (compared | skipped), ``reason``, ``nmse``, ``rating``, ``max_abs_diff``, ``kld_mean``,
            ``kld_mean_se``, ``top1_agreement``, ``n_tokens``, ``n_vocab``, ``limits``, ``remote_code``.
        trust_remote_code: whether the repository's own code was allowed to run.
        timings: seconds the comparison took (``total_s``) and each side's worker (``source_s``, ``gguf_s``); under
            ``timings`` so that comparisons of two runs' manifests leave them out (``release.manifests.VOLATILE_KEYS``).
    """

    checked: bool
    skipped_reason: str | None = None
    passed: bool | None = None
    failures: tuple[str, ...] = ()
    base: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None
    logits: dict[str, Any] | None = None
    trust_remote_code: bool = False
    timings: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as the manifest holds it."""
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out["failures"] = list(self.failures)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceParity:
        """The record from its JSON object (as :func:`record_problem` accepts it)."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: data[k] for k in known if k in data}
        values["failures"] = tuple(values.get("failures") or ())
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @property
    def message(self) -> str:
        """The failures in one sentence, for the error a failed check raises."""
        return "the GGUF is not faithful to its source: " + "; ".join(self.failures)


def not_checked(reason: str, *, base: str | None = None) -> SourceParity:
    """The record of a comparison that did not run, with the reason (never skipped silently)."""
    return SourceParity(checked=False, skipped_reason=reason, base=base)


def record_problem(value: object) -> str | None:
    """Why ``value`` is not a ``source_parity`` record (``field: why``), or None when it is one."""
    if not isinstance(value, Mapping):
        return "expected an object"
    if not isinstance(value.get("checked"), bool):
        return "checked: expected true or false"
    if value.get("passed") is not None and not isinstance(value["passed"], bool):
        return "passed: expected true, false or null"
    if value.get("skipped_reason") is not None and not isinstance(value["skipped_reason"], str):
        return "skipped_reason: expected a string"
    failures = value.get("failures", [])
    if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
        return "failures: expected a list of strings"
    for key in ("tokenizer", "chat_template", "hyperparameters", "logits", "timings"):
        if value.get(key) is not None and not isinstance(value[key], Mapping):
            return f"{key}: expected an object"
    if value["checked"] is False and not value.get("skipped_reason"):
        return "skipped_reason: a record that was not checked must say why"
    return None


def summary(record: Mapping[str, Any] | None) -> str:
    """One short line for reports, cards and job summaries: NMSE, KLD ± se, top-1, tokenizer, template."""
    if not isinstance(record, Mapping):
        return "not recorded"
    if not record.get("checked"):
        return f"not checked: {record.get('skipped_reason') or 'no reason recorded'}"
    parts = ["passed" if record.get("passed") else "FAILED"]
    logits = record.get("logits") or {}
    if logits.get("status") == "compared" and isinstance(logits.get("nmse"), (int, float)):
        parts.append(f"NMSE {logits['nmse']:.2g} ({logits.get('rating', '?')})")
        if isinstance(logits.get("kld_mean"), (int, float)):
            se = logits.get("kld_mean_se")
            parts.append(f"KLD {logits['kld_mean']:.2g}" + (f" ± {se:.1g}" if isinstance(se, (int, float)) else ""))
        if isinstance(logits.get("top1_agreement"), (int, float)):
            parts.append(f"top-1 {100 * logits['top1_agreement']:.1f}%")
    elif logits:
        parts.append(f"logits not compared ({logits.get('reason', '?')})")
    tok = record.get("tokenizer") or {}
    if tok.get("status") == "compared":
        parts.append(f"tokenizer {tok.get('n_differing')}/{tok.get('n_strings')} strings differ")
    elif tok:
        parts.append("tokenizer not compared")
    template = record.get("chat_template") or {}
    if template:
        parts.append(f"chat template {template.get('status')}")
    return ", ".join(parts)
