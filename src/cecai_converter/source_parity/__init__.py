"""Is a GGUF faithful to the model it came from? Its tokenizer, chat template, hyperparameters and logits against
the source folder's, through transformers.

Every other check compares files with *our own base GGUF*; a conversion bug that makes a wrong base (a pre-tokenizer
or added-token mismatch, a misread norm epsilon or rope frequency base, a lost chat template, a tensor read with the
wrong layout) passes them all. This package compares the base with the source, as llama.cpp's own conversion guide
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

The work runs in two worker processes (:func:`cecai_converter.processes.run_worker`): the source side (transformers,
torch) writes its tokenizer results to a temporary folder, then loads the model and writes its logits; the GGUF
side (llama.cpp) starts as soon as the tokenizer results are there, so that the two forward passes run at the same
time, and writes its own logits; the parent compares them. Each process's memory is released when it ends; a crash
is a clean error. The source model
must fit in memory: its float32 size (weights from the safetensors headers × 4) plus headroom is held against the
memory available (``MemAvailable``, or ``CECAI_SOURCE_RAM_BUDGET``); above it the logits are not compared and the
record says why. A model whose transformers class needs the repository's own code is never run without
``--trust-remote-code``; without it the logits (and a tokenizer that needs it) are skipped, with the reason.

The rooms: :mod:`.compare` (:class:`SourceCheck`, :func:`check_source`: the two workers started, waited for and
compared), :mod:`.source_worker` and :mod:`.gguf_worker` (the two sides), :mod:`.tokenizer`, :mod:`.templates`,
:mod:`.hyperparameters` and :mod:`.logits` (each comparison) and :mod:`.source_folder` (config.json, the weights
count, the memory budget); below this package, :mod:`cecai_converter.parity_limits` (the pass mark, ``THRESHOLDS``'s
``source`` entry) and :mod:`cecai_converter.parity_record` (the manifest's record), which fidelity and the manifest
read without importing the comparison. This file exports the entry points the rest of the package uses.

The result is a :class:`SourceParity` record, stored in the manifest as ``source_parity``.
"""

from __future__ import annotations

from ..parity_limits import EXCELLENT_NMSE, LIMIT_KEYS, MAX_NMSE, validate_limits
from ..parity_record import SourceParity, not_checked, record_problem, summary
from .compare import SourceCheck, check_source
from .logits import N_TOKENS, nmse, rating
from .source_folder import RAM_BUDGET_ENV, ram_budget
from .tokenizer import CORPUS, corpus_strings

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
