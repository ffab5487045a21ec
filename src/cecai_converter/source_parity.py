"""Is a GGUF faithful to the model it came from? Its tokenizer, chat template, hyperparameters and logits against
the source folder's, through transformers.

Every other check compares files with *our own base GGUF*; a conversion bug that makes a wrong base (a pre-tokenizer
or added-token mismatch, a misread norm epsilon or rope frequency base, a lost chat template, a tensor read with the
wrong layout) passes them all. This module compares the base with the source, as llama.cpp's own conversion guide
does by hand (``examples/model-conversion``):

* **Tokenizer.** The source's tokenizer (``transformers.AutoTokenizer``, local files only) and the GGUF's (the
  pinned runtime's ``tokenize``) split the shipped corpus (``data/parity_corpus.json``: prose, code, several scripts
  and languages, runs of whitespace and digits, emoji), every added and special token of the source (alone and
  inside text) and the evaluation text into token ids, without special tokens (``add_special_tokens=False`` /
  ``add_bos=False``; both recognise special-token text, as a chat prompt is tokenized). Exact equality. Separately:
  the BOS and EOS ids, and what each adds around a text when asked to (``add_bos`` / ``add_eos``).
* **Chat template.** The GGUF's ``tokenizer.chat_template`` (and named ``tokenizer.chat_template.<name>``) must
  equal the source's template as transformers loads it (``tokenizer_config.json`` or ``chat_template.jinja``). A
  fixed conversation (system, user, assistant; a tool call when the template mentions tools) rendered by
  transformers (``apply_chat_template``) and by the runtime's own formatter (``Jinja2ChatFormatter``) must give the
  same text, wherever both render it (a template that raises in one is recorded as "not rendered by …").
* **Hyperparameters.** ``config.json``'s rope frequency base, norm epsilon, layer, width and head counts against the
  GGUF's metadata, where both state them: a misread value is named, not just seen in the logits.
* **Logits.** transformers' forward pass (float32, CPU, ``trust_remote_code`` only with the opt-in) and the GGUF's
  (llama-cpp-python, CPU) on the same tokens: the first :data:`N_TOKENS` tokens of the evaluation text fidelity
  uses, as the source's tokenizer gives them (the tokenizer check proves the GGUF's gives the same). Reported: NMSE
  as llama.cpp's ``check-nmse.py`` computes it (mean squared error over every logit divided by the variance of the
  reference logits; below 1e-4 "excellent", at or above :data:`MAX_NMSE` a failure), the mean KL-divergence
  KL(source ‖ GGUF) per position with its standard error, and the top-1 agreement.

The work runs in two worker processes (:func:`cecai_converter.tools.run_worker`): the source side (transformers,
torch) writes its tokenizer results to a temporary folder, then loads the model and writes its logits; the GGUF
side (llama.cpp) starts as soon as the tokenizer results are there, so that the two forward passes run at the same
time, and writes its own logits; the parent compares them. Each process's memory is released when it ends; a crash
is a clean error. The source model
must fit in memory: its float32 size (weights from the safetensors headers × 4) plus headroom is held against the
memory available (``MemAvailable``, or ``CECAI_SOURCE_RAM_BUDGET``); above it the logits are not compared and the
record says why. A model whose transformers class needs the repository's own code is never run without
``--trust-remote-code``; without it the logits (and a tokenizer that needs it) are skipped, with the reason.

The result is a :class:`SourceParity` record, stored in the manifest as ``source_parity``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError, SourceCheckFailed, UsageError, WorkerFailed
from .gguf_header import GGUFHeaderError, read_header
from .names import show
from .output import get_logger
from .threads import lease_cores, machine_cores, worker_env
from .tools import (
    WorkerUsage,
    child_kwargs,
    describe_exit,
    failure_summary,
    quiet_abort_env,
    run_worker,
    serve_job,
)

__all__ = [
    "CORPUS",
    "EXCELLENT_NMSE",
    "LIMIT_KEYS",
    "MAX_NMSE",
    "N_TOKENS",
    "RAM_BUDGET_ENV",
    "SourceCheck",
    "SourceParity",
    "check_source",
    "corpus_strings",
    "nmse",
    "not_checked",
    "ram_budget",
    "rating",
    "record_problem",
    "summary",
    "validate_limits",
]

#: The shipped tokenizer corpus (``data/parity_corpus.json``).
CORPUS: Final = "parity_corpus.json"
#: llama.cpp's pass mark for a conversion (``check-nmse.py``): NMSE at or above it fails.
MAX_NMSE: Final = 1e-2
#: Below this llama.cpp calls a conversion "excellent".
EXCELLENT_NMSE: Final = 1e-4
#: Tokens of the evaluation text the logits are compared on.
N_TOKENS: Final = 128
#: The limits a ``THRESHOLDS: {source: {...}}`` entry may set → (logits key, whether the value must stay at or below).
LIMIT_KEYS: Final[Mapping[str, tuple[str, bool]]] = {
    "max_nmse": ("nmse", True),
    "max_kld": ("kld_mean", True),
    "min_top1": ("top1_agreement", False),
}
#: A memory budget for the source model, in bytes (``8G``, ``512M`` and ``8GiB`` are accepted too).
RAM_BUDGET_ENV: Final = "CECAI_SOURCE_RAM_BUDGET"
#: Memory beyond the float32 weights: the interpreter, torch and transformers, activations, the tokenizer.
_HEADROOM_BYTES: Final = 1536 * 2**20
_HEADROOM_FACTOR: Final = 1.25
#: A text around each added token, to see it recognised inside text and not only alone.
_EMBED: Final = ("Hi {}", "a{}b")
#: A text that shows what each side adds around a text when asked to (BOS, EOS).
_SPECIAL_SAMPLE: Final = "Hello world"
_SHOWN_IDS: Final = 24
_SHOWN_CHARS: Final = 60

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

#: config.json key(s) → GGUF key suffix (after ``<arch>.``) and what it is, for the hyperparameter check.
_HYPERPARAMETERS: Final = (
    (("rope_theta",), "rope.freq_base", "rope frequency base"),
    (("rms_norm_eps",), "attention.layer_norm_rms_epsilon", "RMS norm epsilon"),
    (("layer_norm_eps", "layer_norm_epsilon"), "attention.layer_norm_epsilon", "norm epsilon"),
    (("num_hidden_layers", "n_layer"), "block_count", "layer count"),
    (("hidden_size", "n_embd"), "embedding_length", "hidden size"),
    (("num_attention_heads", "n_head"), "attention.head_count", "attention heads"),
    (("num_key_value_heads",), "attention.head_count_kv", "key/value heads"),
)


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
            ``timings`` so that comparisons of two runs' manifests leave them out (``publish.VOLATILE_KEYS``).
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


# --- the parent side -------------------------------------------------------------------------------------------


def corpus_strings() -> list[str]:
    """The shipped tokenizer corpus."""
    data = json.loads((resources.files("cecai_converter") / "data" / CORPUS).read_text(encoding="utf-8"))
    return [str(s) for s in data["strings"]]


def nmse(reference: Any, test: Any) -> float:
    """llama.cpp's ``check-nmse.py``: the mean squared error over every value, divided by the variance of the
    reference (0 for identical arrays; infinite for a difference from a constant reference)."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    diff = np.asarray(test, dtype=np.float64) - ref
    mse = float(np.mean(diff * diff))
    var = float(np.var(ref))
    if var == 0.0:
        return math.inf if mse > 0 else 0.0
    return mse / var


def rating(value: float) -> str:
    """llama.cpp's words for an NMSE (``check-nmse.py``'s interpretation)."""
    for limit, words in ((0.0, "perfect"), (1e-6, "essentially identical"), (EXCELLENT_NMSE, "excellent"),
                         (1e-3, "very good"), (MAX_NMSE, "good"), (0.1, "acceptable"), (1.0, "poor")):  # fmt: skip
        if value < limit or (limit == 0.0 and value == 0.0):
            return words
    return "very poor"


def ram_budget() -> int:
    """The memory the source side may use: ``CECAI_SOURCE_RAM_BUDGET`` when set, else ``MemAvailable``.

    Raises:
        UsageError: the variable is not a size.
    """
    text = os.environ.get(RAM_BUDGET_ENV, "").strip()
    if text:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?", text, re.IGNORECASE)
        if match is None:
            raise UsageError(
                f"{RAM_BUDGET_ENV}={show(text)} is not a size", hint="give bytes, or a number with K, M, G or T"
            )
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
        return int(float(match.group(1)) * scale)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 2**30  # no /proc (not Linux): a modest machine


def _parameters(folder: Path) -> int:
    """The weights in the folder's safetensors files, from their headers (0 when it has none)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, RecursionError, struct.error):
            continue
        for key, info in header.items():
            if key != "__metadata__" and isinstance(info, dict):
                count = 1
                for dim in info.get("shape", []):
                    count *= int(dim)
                total += count
    return total


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def _needs_remote_code(config: Mapping[str, Any], what: str) -> str | None:
    """The ``auto_map`` entry naming the repository's own class for ``what`` (AutoModelForCausalLM…), if any."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, Mapping):
        return None
    value = auto_map.get(what)
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str)), None)
    return value if isinstance(value, str) else None


def _hyperparameters(config: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """config.json against the GGUF's metadata, for the values both state."""
    text = _text_config(config)
    arch = str(metadata.get("general.architecture", ""))
    rope = text.get("rope_parameters") if isinstance(text.get("rope_parameters"), Mapping) else {}
    compared: list[str] = []
    differing: list[dict[str, Any]] = []
    for keys, suffix, name in _HYPERPARAMETERS:
        key = next((k for k in keys if k in text), None)
        source_value = text.get(key) if key else None
        if source_value is None and "rope_theta" in keys and isinstance(rope, Mapping):
            key, source_value = "rope_parameters.rope_theta", rope.get("rope_theta")
        gguf_key = f"{arch}.{suffix}"
        gguf_value = metadata.get(gguf_key)
        numbers = (source_value, gguf_value)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            continue
        compared.append(name)
        a, b = float(source_value), float(gguf_value)  # type: ignore[arg-type]
        # The GGUF stores floats as float32: the same value read back differs in the 8th digit at most.
        if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12):
            differing.append({"name": name, "source_key": key, "gguf_key": gguf_key, "source": source_value,
                              "gguf": gguf_value})  # fmt: skip
    return {"compared": compared, "differing": differing}


def _gguf_templates(metadata: Mapping[str, Any]) -> dict[str, str]:
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


def _shown(ids: Sequence[int]) -> str:
    head = ", ".join(str(i) for i in ids[:_SHOWN_IDS])
    return f"[{head}{', …' if len(ids) > _SHOWN_IDS else ''}]"


def _shown_text(text: str) -> str:
    return show(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…")


def check_source(
    source: Path,
    gguf: Path,
    *,
    trust_remote_code: bool = False,
    eval_text: Path | None = None,
    limits: Mapping[str, float] | None = None,
    n_tokens: int = N_TOKENS,
    threads: int | None = None,
    timeout_s: float | None = None,
) -> SourceParity:
    """Compare ``gguf`` with the model folder ``source`` (see the module docstring): :class:`SourceCheck`, started
    and finished at once.

    Args:
        source: a Hugging Face model folder (config.json, safetensors, tokenizer files).
        gguf: the GGUF to judge (the run's base).
        trust_remote_code: let transformers run the repository's own code where the model needs it.
        eval_text: the text the logits are compared on (default: the shipped evaluation text).
        limits: ``max_nmse`` (default :data:`MAX_NMSE`), and optionally ``max_kld`` and ``min_top1``.
        n_tokens: tokens of the text compared.
        threads: CPU threads for torch and llama.cpp (default: theirs).
        timeout_s: a time limit for each side.

    Returns:
        The record; ``passed`` False with ``failures`` when something differs.

    Raises:
        UsageError: a file is missing or unreadable (exit 2).
        SourceCheckFailed: a side could not be run (a crash, a timeout, a file llama.cpp cannot load).
    """
    check = SourceCheck(
        source, trust_remote_code=trust_remote_code, eval_text=eval_text, limits=limits, n_tokens=n_tokens,
        threads=threads, timeout_s=timeout_s,
    )  # fmt: skip
    with check:
        return check.finish(gguf)


class SourceCheck:
    """One comparison with a source model, in two steps: :meth:`start` runs the source side (transformers) in a
    worker process in the background, :meth:`finish` runs the GGUF side beside what is left of it (from the moment
    the source's tokenizer results are in), waits for both and compares.

    The source side does not need the GGUF, so a conversion starts it before the converter writes the base and the
    two overlap; when memory is short (the source model's float32 size twice over the budget) it starts only in
    :meth:`finish`, after the converter is done. :meth:`stop` (also on leaving a ``with`` block) ends a worker still
    running, with everything it started, and removes the temporary files: a failed conversion or Ctrl-C leaves
    nothing behind.

    Raises (constructor):
        UsageError: the folder has no readable config.json, or the evaluation text is missing.
    """

    def __init__(
        self,
        source: Path,
        *,
        trust_remote_code: bool = False,
        eval_text: Path | None = None,
        limits: Mapping[str, float] | None = None,
        n_tokens: int = N_TOKENS,
        threads: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.source = Path(source)
        self.config = _read_json(self.source / "config.json")
        if not self.config:
            raise UsageError(
                f"source check: {self.source / 'config.json'} is missing or not a JSON object",
                hint="give the model folder the GGUF was converted from (config.json, weights, tokenizer)",
            )
        self.text_path = Path(eval_text) if eval_text is not None else _default_eval_text()
        if not self.text_path.is_file():
            raise UsageError(f"source check: the evaluation text {self.text_path} is missing")
        self.trust_remote_code = trust_remote_code
        self.limits = {"max_nmse": MAX_NMSE, **(limits or {})}
        self.threads, self.timeout_s = threads, timeout_s
        trained = next((v for k in ("max_position_embeddings", "n_positions", "n_ctx")
                        if isinstance(v := _text_config(self.config).get(k), int) and v > 0), 0)  # fmt: skip
        self.n_tokens = min(n_tokens, trained) if trained else n_tokens
        self.remote = _needs_remote_code(self.config, "AutoModelForCausalLM")
        self.estimate = int(_parameters(self.source) * 4 * _HEADROOM_FACTOR) + _HEADROOM_BYTES
        self.budget = ram_budget()
        self.logits_reason: str | None = None
        if self.estimate > self.budget:
            self.logits_reason = (
                f"the source model needs about {self.estimate / 2**30:.1f} GiB in float32 and "
                f"{self.budget / 2**30:.1f} GiB are available ({RAM_BUDGET_ENV} or MemAvailable): its logits were "
                "not compared"
            )
        self.strings = corpus_strings()
        self._work: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._started = 0.0
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> SourceCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, background: bool = True) -> SourceCheck:
        """Start the source side's worker (once). With ``background``, not while memory is short (see above)."""
        if self._proc is not None or self._result is not None:
            return self
        if background and self.logits_reason is None and 2 * self.estimate > self.budget:
            return self  # the converter and the source model would not fit together: finish() starts it later
        self._work = Path(tempfile.mkdtemp(prefix="cecai-parity-"))
        job = {"role": "source", "source": str(self.source), "strings": self.strings, "text": str(self.text_path),
               "n_tokens": self.n_tokens, "logits": self.logits_reason is None,
               "trust_remote_code": self.trust_remote_code, "remote_class": self.remote, "work": str(self._work),
               "threads": self.threads, "conversations": _conversations()}  # fmt: skip
        (self._work / "source-job.json").write_text(json.dumps(job), encoding="utf-8")
        argv = [sys.executable, "-m", "cecai_converter.source_parity", "--job", str(self._work / "source-job.json"),
                "--result", str(self._work / "source-result.json")]  # fmt: skip
        self._log = (self._work / "source.log").open("wb")
        self._started = time.monotonic()
        # Cores from the machine-wide lease (threads.py), held by the worker itself. It asks for half of them: it
        # runs beside the converter or the GGUF side, which share the machine with it instead of waiting for it.
        share = self.threads or max(1, machine_cores() // 2)
        with lease_cores(share, on_wait=_log.info) as cores:
            env = {**quiet_abort_env(), **os.environ, **worker_env(cores.threads), "CUDA_VISIBLE_DEVICES": ""}
            # The worker protocol of tools.run_worker (serve_job on the other side), started without waiting: its
            # own process group (stop() ends all of it), killed with this process.
            self._proc = subprocess.Popen(  # not run_tool: it runs beside the converter; run_worker would wait
                argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, pass_fds=tuple(cores.fds), **child_kwargs(),
            )  # fmt: skip
        return self

    def stop(self) -> None:
        """End the source side's worker if it still runs (and all it started); remove the temporary files."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        self._proc = None

    def _early_side(self) -> dict[str, Any]:
        """The source side's tokenizer results, as soon as the worker has them (starting it if it is not running);
        the whole result when the worker has ended first."""
        if self._result is not None:
            return self._result
        self.start(background=False)
        assert self._proc is not None and self._work is not None
        early = self._work / _EARLY_FILE
        waited = time.monotonic()
        while not early.is_file() and self._proc.poll() is None:
            if self.timeout_s is not None and time.monotonic() - waited > self.timeout_s:
                break  # _source_side() reports the timeout
            time.sleep(_POLL_S)
        try:
            data = json.loads(early.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return self._source_side()  # the worker ended without it: its result, or why it failed
        return data if isinstance(data, dict) else self._source_side()

    def _source_side(self) -> dict[str, Any]:
        """The source side's result: wait for the worker (starting it if it is not running)."""
        if self._result is not None:
            return self._result
        self.start(background=False)
        assert self._proc is not None and self._work is not None
        try:
            code = self._proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise SourceCheckFailed(
                f"source check: the source model (transformers) was not evaluated within {self.timeout_s:g} s",
                hint=_FAILED_HINT,
            ) from None
        seconds = time.monotonic() - self._started
        self._log.close()
        self._log = None
        tail = (self._work / "source.log").read_text(encoding="utf-8", errors="replace")[-_TAIL_CHARS:]
        for line in tail.splitlines():
            _log.debug(line)
        try:
            reply = json.loads((self._work / "source-result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            reply = None
        if isinstance(reply, dict) and reply.get("ok") is True and code == 0:
            self._result = {**reply["result"], "seconds": round(seconds, 3)}
            return self._result
        if isinstance(reply, dict) and reply.get("ok") is False:
            why = str(reply.get("error") or "no reason given")
        else:
            why = f"the worker {describe_exit(code)} ({failure_summary(tail)})"
        raise SourceCheckFailed(f"source check: the source model (transformers) could not be evaluated: {why}",
                                hint=_FAILED_HINT)  # fmt: skip

    def finish(self, gguf: Path) -> SourceParity:
        """Compare ``gguf`` with the source (waiting for the source side), and return the record.

        Raises:
            UsageError: ``gguf`` is not a readable GGUF file.
            SourceCheckFailed: a side could not be run.
        """
        started = time.perf_counter()
        gguf = Path(gguf)
        try:
            header = read_header(gguf)
        except (OSError, GGUFHeaderError) as exc:
            raise UsageError(f"source check: {gguf} is not a readable GGUF file ({exc})") from None
        arch = str(header.metadata.get("general.architecture", ""))
        n_ctx_train = int(header.metadata.get(f"{arch}.context_length", 0) or 0)
        # The GGUF side needs only the source's tokenizer results, which the source worker writes before it loads
        # the model: it runs beside the rest of the source side (the forward pass), not after it.
        early = self._early_side()
        assert self._work is not None
        logits_reason = self.logits_reason or (str(early["logits_reason"]) if early.get("logits_reason") else None)
        all_strings = [*self.strings, *early.get("added_strings", [])]
        if "eval_text" in early:
            all_strings.append(early["eval_text"])
        tokens = list(early.get("eval_tokens") or [])
        if n_ctx_train > 0:
            tokens = tokens[:n_ctx_train]
        gguf_job = {"role": "gguf", "model": str(gguf), "strings": all_strings, "sample": _SPECIAL_SAMPLE,
                    "source_encodings": early.get("encodings"), "tokens": tokens if logits_reason is None else None,
                    "work": str(self._work), "threads": self.threads, "conversations": _conversations()}  # fmt: skip
        ggf = _GGUFSide(gguf_job, self.timeout_s)
        try:
            src = self._source_side()
        except SourceCheckFailed:
            ggf.join()  # it writes into the work folder, which stop() removes; an interrupt does not wait for it
            raise
        ggf.join()
        ggf.raise_failure()
        logits_reason = logits_reason or (str(src["logits_reason"]) if src.get("logits_reason") else None)
        if logits_reason is None and tokens:
            ggf.result["logits"] = _compare_saved_logits(self._work, len(tokens))
        failures: list[str] = []
        tokenizer = _compare_tokenizers(src, ggf.result, all_strings, failures)
        template = _compare_templates(src, ggf.result, _gguf_templates(header.metadata), failures)
        hyper = _hyperparameters(self.config, header.metadata)
        for diff in hyper["differing"]:
            failures.append(
                f"the {diff['name']} differs: source {diff['source']!r} (config.json {diff['source_key']}), "
                f"GGUF {diff['gguf']!r} ({diff['gguf_key']})"
            )
        logits = _logits_record(ggf.result, logits_reason, self.limits, self.remote, self.trust_remote_code, failures)
        return SourceParity(
            checked=True,
            passed=not failures,
            failures=tuple(failures),
            base=gguf.name,
            tokenizer=tokenizer,
            chat_template=template,
            hyperparameters=hyper,
            logits=logits,
            trust_remote_code=self.trust_remote_code,
            timings={
                "total_s": round(time.perf_counter() - started, 3),
                "source_s": src.get("seconds"),
                "gguf_s": ggf.result.get("seconds"),
            },
        )


_FAILED_HINT: Final = (
    "the log has the worker's output (-v shows it); --no-source-check (SOURCE_CHECK: false) converts without this "
    "check, and the manifest says so"
)
_TAIL_CHARS: Final = 6000
#: In the work folder: the source worker's tokenizer results (written before it loads the model) and each side's
#: logits (positions × vocabulary, float32).
_EARLY_FILE: Final = "source-tokenizer.json"
_SOURCE_LOGITS: Final = "source-logits.npy"
_GGUF_LOGITS: Final = "gguf-logits.npy"
#: Seconds between two looks for the source worker's tokenizer results.
_POLL_S: Final = 0.05
_log = get_logger("source_parity")


def _default_eval_text() -> Path:
    from .fidelity import default_eval_text

    return default_eval_text()


def _conversations() -> dict[str, dict[str, Any]]:
    return {
        "chat": {"messages": [dict(m) for m in CONVERSATION], "tools": None},
        "tool call": {"messages": json.loads(json.dumps(TOOL_CONVERSATION)), "tools": json.loads(json.dumps(TOOLS))},
    }


def _side(role: str, job: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Run one side's worker; its result, with the seconds it took under ``seconds``."""
    what = "the source model (transformers)" if role == "source" else "the GGUF (llama.cpp)"
    try:
        run = run_worker(
            "cecai_converter.source_parity",
            job,
            timeout=timeout_s,
            name=f"source check ({role})",
            env={"CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE"},
        )
        return {**run.data, "seconds": round(run.seconds, 3)}
    except WorkerFailed as exc:
        raise SourceCheckFailed(
            f"source check: {what} could not be evaluated: {exc.reason}"
            + (f" ({exc.summary})" if exc.summary and exc.kind != "usage" else ""),
            hint="the log has the worker's output (-v shows it live); --no-source-check (SOURCE_CHECK: false) "
            "converts without this check, and the manifest says so",
        ) from None


class _GGUFSide:
    """The GGUF side's worker (:func:`_side`), run from a thread so that the parent can wait for the source side
    meanwhile: each side is a process of its own, holding its own cores (threads.py)."""

    def __init__(self, job: dict[str, Any], timeout_s: float | None) -> None:
        self.result: dict[str, Any] = {}
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job, timeout_s), name="source-check-gguf", daemon=True)
        self._thread.start()

    def _run(self, job: dict[str, Any], timeout_s: float | None) -> None:
        try:
            self.result = _side("gguf", job, timeout_s)
        except BaseException as exc:  # handed to the caller's thread by raise_failure()
            self._failure = exc

    def join(self) -> None:
        self._thread.join()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _compare_saved_logits(work: Path, n_tokens: int) -> dict[str, Any]:
    """Both sides' logits, as their workers saved them, compared (:func:`_compare_logits`)."""
    import numpy as np

    reference = np.load(work / _SOURCE_LOGITS)[:n_tokens]
    ours = np.load(work / _GGUF_LOGITS)[:n_tokens]
    return _compare_logits(reference, ours)


def _compare_tokenizers(
    src: Mapping[str, Any], ggf: Mapping[str, Any], strings: Sequence[str], failures: list[str]
) -> dict[str, Any]:
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
        "add_special": {"text": _SPECIAL_SAMPLE, "source": src.get("with_special"), "gguf": ggf.get("with_special")},
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
            f"{_shown_text(strings[i])} source {_shown(ours[i])} gguf {_shown(theirs[i])}"
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
    parts = ([f"{_shown(before)} before"] if before else []) + ([f"{_shown(after)} after"] if after else [])
    return " and ".join(parts) or "nothing"


def _compare_templates(
    src: Mapping[str, Any], ggf: Mapping[str, Any], in_gguf: Mapping[str, str], failures: list[str]
) -> dict[str, Any]:
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
                f"{_shown_text(mine['text'][start:])}, the runtime {_shown_text(theirs['text'][start:])}"
            )
    overall = (
        "equal" if all(s == "equal" for s in statuses.values()) else next(s for s in statuses.values() if s != "equal")
    )
    return {"status": overall, "names": names, "templates": statuses, "renders": renders}


def _logits_record(
    ggf: Mapping[str, Any],
    reason: str | None,
    limits: Mapping[str, float],
    remote: str | None,
    trust_remote_code: bool,
    failures: list[str],
) -> dict[str, Any]:
    if reason is not None:
        return {"status": "skipped", "reason": reason, "limits": dict(limits)}
    numbers = ggf["logits"]
    record = {"status": "compared", **numbers, "rating": rating(numbers["nmse"]), "limits": dict(limits),
              "device": "cpu", "source_dtype": "float32",
              "remote_code": bool(remote) and trust_remote_code}  # fmt: skip
    if numbers.get("vocab_mismatch"):
        failures.append(str(numbers["vocab_mismatch"]))
        return record
    for name, limit in limits.items():
        key, is_max = LIMIT_KEYS[name]
        value = numbers.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            failures.append(f"the logits could not be compared: {key} = {value!r}")
            continue
        if (value >= limit) if is_max else (value < limit):
            relation = "at or above the limit" if is_max else "below the limit"
            failures.append(
                f"the GGUF's logits differ from the source's: {key} {value:.3g} is {relation} {name} = {limit:g} "
                f"(NMSE {numbers['nmse']:.3g}, KLD {numbers['kld_mean']:.3g}, top-1 "
                f"{100 * numbers['top1_agreement']:.1f}% over {numbers['n_tokens']} tokens)"
            )
    return record


def validate_limits(value: object, where: str) -> dict[str, float]:
    """A ``THRESHOLDS: {source: {...}}`` entry, checked.

    Raises:
        ConfigError: not a mapping, an unknown limit, or a value that is not a finite number.
    """
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: source: expected a mapping of limits, got {show(value)}",
                          hint="e.g. THRESHOLDS: {source: {max_nmse: 0.001}}")  # fmt: skip
    checked: dict[str, float] = {}
    for name, limit in value.items():
        if name not in LIMIT_KEYS:
            raise ConfigError(f"{where}: source: unknown limit {show(name)}", hint=f"known: {', '.join(LIMIT_KEYS)}")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            raise ConfigError(f"{where}: source.{name} must be a number, got {show(limit)}")
        checked[str(name)] = float(limit)
    return checked


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


# --- the workers (separate processes: torch's and llama.cpp's memory is released, a crash is an error) ----------


def _serve(job: Mapping[str, Any]) -> dict[str, Any]:
    return _source_worker(job) if job["role"] == "source" else _gguf_worker(job)


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
        out["with_special"] = list(tok.encode(_SPECIAL_SAMPLE, add_special_tokens=True))
        out["sample_plain"] = list(tok.encode(_SPECIAL_SAMPLE, add_special_tokens=False))
        out["bos_id"], out["eos_id"] = tok.bos_token_id, tok.eos_token_id
        template = getattr(tok, "chat_template", None)
        out["chat_template"] = template if isinstance(template, (str, dict, list)) else None
        out["renders"] = _render_transformers(tok, job["conversations"], out["chat_template"])
        tokens = list(tok.encode(text, add_special_tokens=True))[: int(job["n_tokens"])]
        out["eval_tokens"] = tokens
    else:
        out["file_chat_template"] = _read_json(folder / "tokenizer_config.json").get("chat_template")
        out["logits_reason"] = "the source's tokenizer could not be loaded, so the same tokens cannot be fed to both"
    # What the GGUF side needs, before the model is loaded: the parent starts that side with it as soon as the base
    # is written, and the two evaluate the tokens at the same time (written whole, then renamed into place).
    early = Path(job["work"]) / _EARLY_FILE
    early.with_suffix(".part").write_text(json.dumps(out), encoding="utf-8")
    os.replace(early.with_suffix(".part"), early)
    if job["logits"] and tokens is not None:
        logits = _source_logits(folder, trust, job.get("remote_class"), tokens, out)
        if logits is not None:
            np.save(Path(job["work"]) / _SOURCE_LOGITS, logits)
            out["n_vocab"] = int(logits.shape[1])
    return out


def _load_tokenizer(folder: Path, trust: bool, out: dict[str, Any]) -> Any:
    remote = _needs_remote_code(_read_json(folder / "tokenizer_config.json"), "AutoTokenizer")
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

    config = _read_json(folder / "config.json")
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


def _gguf_worker(job: Mapping[str, Any]) -> dict[str, Any]:
    """llama.cpp's side: tokenize, render the templates, evaluate the tokens (logits written to the work folder)."""
    import llama_cpp
    import numpy as np

    tokens = job.get("tokens")
    kwargs: dict[str, Any] = {"model_path": job["model"], "n_gpu_layers": 0, "verbose": False, "seed": 0}
    if tokens:
        n_ctx = max(len(tokens), 8)
        kwargs.update(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True)
    else:
        kwargs.update(vocab_only=True, n_ctx=8)
    if job.get("threads"):
        kwargs["n_threads"] = kwargs["n_threads_batch"] = int(job["threads"])
    try:
        llm = llama_cpp.Llama(**kwargs)
    except ValueError as exc:
        raise WorkerUsage(f"llama.cpp could not load {job['model']}: {exc}") from None
    model = llm._model  # llama-cpp-python's model wrapper: the vocabulary's BOS/EOS and add_bos live there
    out: dict[str, Any] = {
        "encodings": [llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in job["strings"]],
        "with_special": llm.tokenize(str(job["sample"]).encode("utf-8"), add_bos=True, special=True),
        "sample_plain": llm.tokenize(str(job["sample"]).encode("utf-8"), add_bos=False, special=True),
        "bos_id": _token_or_none(llm.token_bos()),
        "eos_id": _token_or_none(llm.token_eos()),
        "add_bos": bool(model.add_bos_token()),
        "add_eos": bool(model.add_eos_token()),
    }
    if job.get("source_encodings") is not None:
        out["space_prefix_only"] = [
            i
            for i, (mine, theirs) in enumerate(zip(job["source_encodings"], out["encodings"], strict=True))
            if list(mine) != list(theirs) and _space_prefix_only(llm, mine, theirs)
        ]
    bos = model.token_get_text(out["bos_id"]) if out["bos_id"] is not None else ""
    eos = model.token_get_text(out["eos_id"]) if out["eos_id"] is not None else ""
    template = (llm.metadata or {}).get("tokenizer.chat_template")
    out["renders"] = _render_runtime(template, bos, eos, job["conversations"])
    if tokens:
        llm.eval(list(tokens))
        # compared by the parent, once the source side (which may still be running) has written its own
        np.save(Path(job["work"]) / _GGUF_LOGITS, np.array(llm.scores[: len(tokens)], dtype=np.float32))
    return out


def _space_prefix_only(llm: Any, source_ids: Sequence[int], gguf_ids: Sequence[int]) -> bool:
    """Whether two different tokenizations differ only by llama.cpp's SentencePiece space prefix.

    llama.cpp's SentencePiece tokenizer puts a space before every piece of text that starts a string or follows a
    special token, even one that starts with a space already (as sentencepiece's own ``add_dummy_prefix`` does);
    transformers' tokenizer does not in those two places. That is the runtime's documented behaviour, not a
    conversion error: the two sequences must then hold the same special tokens, and between them the same text,
    the GGUF's with one more leading ``▁``.
    """
    import llama_cpp

    vocab = llm._model.vocab
    if llama_cpp.llama_vocab_type(vocab) != llama_cpp.LLAMA_VOCAB_TYPE_SPM:
        return False
    n_vocab = int(llm.n_vocab())
    special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    special |= llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN

    def segments(ids: Sequence[int]) -> tuple[list[list[int]], list[int]] | None:
        parts: list[list[int]] = [[]]
        marks: list[int] = []
        for token in ids:
            if not 0 <= int(token) < n_vocab:
                return None
            if llama_cpp.llama_vocab_get_attr(vocab, int(token)) & special:
                marks.append(int(token))
                parts.append([])
            else:
                parts[-1].append(int(token))
        return parts, marks

    mine, theirs = segments(source_ids), segments(gguf_ids)
    if mine is None or theirs is None or mine[1] != theirs[1]:
        return False
    for a, b in zip(mine[0], theirs[0], strict=True):
        text_a = "".join(llm._model.token_get_text(t) for t in a)
        text_b = "".join(llm._model.token_get_text(t) for t in b)
        if a != b and text_b != "\u2581" + text_a:
            return False
    return True


def _token_or_none(token: int) -> int | None:
    return int(token) if token is not None and int(token) >= 0 else None


def _render_runtime(template: object, bos: str, eos: str, conversations: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(template, str):
        return {}
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    renders: dict[str, Any] = {}
    for name, conv in conversations.items():
        if conv["tools"] is not None and "tool" not in template:
            continue
        try:
            formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
            renders[name] = {"text": formatter(messages=conv["messages"], tools=conv["tools"]).prompt}
        except Exception as exc:  # a template that raises is recorded, not a failure of the check
            renders[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return renders


def _compare_logits(reference: Any, test: Any) -> dict[str, Any]:
    """NMSE, KL(source ‖ GGUF) per position (mean, standard error), top-1 agreement, largest difference."""
    import numpy as np

    if reference.shape != test.shape:
        return {
            "vocab_mismatch": f"the logits have other shapes: source {list(reference.shape)}, GGUF "
            f"{list(test.shape)} (positions × vocabulary): the vocabularies differ in size",
            "nmse": math.inf, "kld_mean": math.inf, "kld_mean_se": 0.0, "top1_agreement": 0.0,
            "n_tokens": int(reference.shape[0]), "n_vocab": int(test.shape[1]),
        }  # fmt: skip
    from .fidelity import log_softmax_rows

    logp = log_softmax_rows(reference).astype(np.float64)
    logq = log_softmax_rows(test).astype(np.float64)
    kld = (np.exp(logp) * (logp - logq)).sum(axis=1)
    n = int(kld.size)
    mean = float(kld.mean())
    se = math.sqrt(float(np.var(kld)) / (n - 1)) if n > 1 else 0.0
    return {
        "nmse": nmse(reference, test),
        "max_abs_diff": float(np.abs(reference.astype(np.float64) - test).max()),
        "kld_mean": mean,
        "kld_mean_se": se,
        "top1_agreement": float((reference.argmax(axis=1) == test.argmax(axis=1)).mean()),
        "n_tokens": n,
        "n_vocab": int(reference.shape[1]),
    }


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(serve_job(_serve))
