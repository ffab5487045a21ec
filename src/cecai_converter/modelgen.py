"""Small, deterministic Hugging Face models built on this machine: the embedded default, test fixtures, benchmarks.

Nothing is downloaded. Weights are random (seeded). Llama and Phi-3 get a SentencePiece model trained on a short
text shipped with the package, which keeps their converters on the SentencePiece path llama.cpp accepts for any
tokenizer. ``gpt2-bpe`` gets a byte-level BPE ``tokenizer.json`` that llama.cpp's converter does not recognise (its
pre-tokenizer hash is in no list), for the error path.

Qwen2 gets Qwen2's own byte-level BPE: the converter recognises a BPE tokenizer only by the token ids it gives a
fixed text (``get_vocab_base_pre`` hashes them), so a tokenizer that merely *behaves* like Qwen2's with a small
vocabulary of its own would be refused. The qwen2 model therefore ships a subset of Qwen2's real vocabulary, at
Qwen2's own ids (``data/qwen2_vocab.json``, taken from the copy of Qwen2's vocabulary in the pinned llama.cpp
sources, see :func:`qwen2_vocab_data`): every token and merge Qwen2's BPE goes through on llama.cpp's tokenizer
tests (the hashed text among them) and on the shipped corpora. On those texts it gives exactly Qwen2's ids, so the
converter writes ``tokenizer.ggml.pre = qwen2`` and the runtime splits text with Qwen2's rules; the config keeps
Qwen2's vocabulary size (151936; unused ids are padding rows, as in Qwen2's GGUFs) and ties the output to the
embedding, as the small Qwen2 models do.

Needs the ``local`` extra (torch, transformers, sentencepiece).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

import yaml

from .pairs import DEFAULT_PAIR
from .precisions import DEFAULT_PRECISIONS
from .toolchain import LLAMA_CPP_PYTHON_VERSION, SDIST_SHA256, extract_llama_cpp

__all__ = [
    "ARCHITECTURES",
    "SIZES",
    "TOWERS",
    "build_model",
    "build_model_with_tower",
    "build_vision_model",
    "make_seed_layout",
    "qwen2_vocab_data",
    "write_qwen2_vocab_data",
]


@dataclass(frozen=True)
class _Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


# hidden sizes are multiples of 256 so that k-quants (blocks of 256) apply to every matrix, as in real models.
SIZES: Final[dict[str, _Size]] = {
    "tiny": _Size(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=1024),
    "small": _Size(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, vocab=4096),
    # ~0.55 B parameters: 1.1 GB in bf16, for benchmarks ("a model of at least 1 GB").
    "1gb": _Size(hidden=1536, layers=18, heads=12, kv_heads=4, intermediate=4096, vocab=32000),
    # ~3.2 B parameters (Llama-3.2-3B's widths, 30 layers): 6.4 GB in bf16, for benchmarks/checks.py's cost growth.
    "3b": _Size(hidden=3072, layers=30, heads=24, kv_heads=8, intermediate=8192, vocab=32000),
    # The exception, on purpose: an FFN width of 320 (a multiple of 32, not of 256) makes llama.cpp's quantizer
    # fall back from k-quants for ffn_down (its rows are 320 long), the case quantization records must show.
    "tiny-odd-ffn": _Size(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=320, vocab=1024),
}
ARCHITECTURES: Final = ("llama", "qwen2", "phi3", "gpt2-bpe")
_SPM_PIECES: Final = 400  # trained pieces; the config's vocab_size pads the rest, as real checkpoints often do

#: Qwen2's vocabulary size (config.json of Qwen2-0.5B) and the ids of its special tokens (its tokenizer.json).
QWEN2_VOCAB_SIZE: Final = 151936
QWEN2_SPECIAL_TOKENS: Final[dict[str, int]] = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
#: Qwen2's pre-tokenizer split (its tokenizer.json; transformers' Qwen2Tokenizer builds the same).
QWEN2_SPLIT: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: The chat template of Qwen2's instruct models (their tokenizer_config.json).
QWEN2_CHAT_TEMPLATE: Final = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: The shipped subset of Qwen2's vocabulary (package data), and where in the pinned sdist's llama.cpp it comes from.
QWEN2_VOCAB_DATA: Final = "qwen2_vocab.json"
QWEN2_VOCAB_MEMBER: Final = "models/ggml-vocab-qwen2.gguf"


def _train_sentencepiece(out_dir: Path, *, gemma: bool = False) -> None:
    import sentencepiece as spm

    corpus = resources.files("cecai_converter") / "data" / "tokenizer_corpus.txt"
    with resources.as_file(corpus) as corpus_path:
        spm.SentencePieceTrainer.train(
            input=str(corpus_path),
            model_prefix=str(out_dir / "tokenizer"),
            vocab_size=_SPM_PIECES,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=-1,
            # llama.cpp's Phi-3 vocabulary code looks this token up by name and fails to load without it.
            user_defined_symbols=["<|endoftext|>"],
            num_threads=1,
            minloglevel=2,
            # Gemma's tokenizer adds no leading space and keeps runs of spaces; llama.cpp's gemma3 vocabulary
            # (add_space_prefix false) reproduces exactly that.
            add_dummy_prefix=not gemma,
            remove_extra_whitespaces=not gemma,
        )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer", "bos_token": "<s>",
             "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
             # GemmaTokenizer would add "<pad>" and "<mask>" tokens of its own, which the vocabulary lacks.
             **({"pad_token": None, "mask_token": None} if gemma else {})},
            indent=2,
        )
        + "\n"
    )  # fmt: skip


def _train_bpe(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (resources.files("cecai_converter") / "data" / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text.splitlines(),
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2TokenizerFast", "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>", "model_max_length": 256}, indent=2) + "\n"
    )  # fmt: skip


def _qwen2_tokenizer(vocab: dict[str, int], merges: list[str]) -> Any:
    """A ``tokenizers.Tokenizer`` laid out as Qwen2's tokenizer.json: NFC, the Qwen2 split, byte-level BPE, and its
    special tokens as added tokens at Qwen2's ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pairs = [tuple(m.split(" ")) for m in merges]
    # The special tokens are in the model's vocabulary too (Qwen2's own tokenizer.json lists them only as added
    # tokens): an added token takes its id from there, where both tokenizers and transformers 5's Qwen2Tokenizer
    # (which rebuilds the tokenizer from the vocabulary and merges alone) would otherwise number it after the
    # vocabulary's count, ~1600 here, since this vocabulary has gaps.
    vocab = {**vocab, **QWEN2_SPECIAL_TOKENS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))  # type: ignore[arg-type]
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
    if any(tok.token_to_id(t) != i for t, i in QWEN2_SPECIAL_TOKENS.items()):
        raise ValueError("tokenizers numbered Qwen2's special tokens otherwise")  # a tokenizers release changed that
    return tok


def _bpe_history(word: str, ranks: dict[tuple[str, str], int], seen: set[str]) -> None:
    """Run byte-level BPE on one pre-tokenized word, adding every symbol it passes through to ``seen``."""
    symbols = list(word)
    seen.update(symbols)
    while len(symbols) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        seen.add(symbols[i])


def qwen2_vocab_data(sdist: Path) -> dict[str, Any]:
    """The shipped subset of Qwen2's vocabulary (``data/qwen2_vocab.json``), rebuilt from the pinned sdist.

    Reads llama.cpp's copy of Qwen2's vocabulary (:data:`QWEN2_VOCAB_MEMBER`, 151,643 tokens and their merges) and
    its tokenizer tests (``….gguf.inp``/``.out``: 46 texts, among them the text the converter hashes, and Qwen2's
    ids for each). Keeps the 256 byte tokens and every token Qwen2's BPE passes through on those texts and on the
    shipped ``tokenizer_corpus.txt`` and ``parity_corpus.json``, at Qwen2's ids, with every merge among them in
    Qwen2's order. A BPE run on such a text then takes the same steps as with the whole vocabulary (each merge it
    takes is kept, and no kept merge outranks one it takes), which is checked: the subset must give the ``.out``
    ids for every test text. Regenerate the file with :func:`write_qwen2_vocab_data`.

    Raises:
        ValueError: the sdist holds no Qwen2 vocabulary, or the subset does not reproduce llama.cpp's test ids.
    """
    import tempfile

    import gguf
    from tokenizers import Regex, normalizers, pre_tokenizers

    with tempfile.TemporaryDirectory(prefix="cecai-qwen2-vocab-") as tmp:
        root = extract_llama_cpp(Path(sdist), Path(tmp), (QWEN2_VOCAB_MEMBER,))
        path = root / QWEN2_VOCAB_MEMBER
        if not path.is_file():
            raise ValueError(f"{sdist} holds no vendor/llama.cpp/{QWEN2_VOCAB_MEMBER}")
        inp, out = path.with_name(path.name + ".inp"), path.with_name(path.name + ".out")
        tests = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]  # each test ends with one
        expected = [[int(t) for t in line.split()] for line in out.read_text(encoding="ascii").split("\n")]
        reader = gguf.GGUFReader(path)

        def strings(key: str) -> list[str]:
            field = reader.fields[key]
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

        tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
        types_field = reader.fields["tokenizer.ggml.token_type"]
        types = [int(types_field.parts[i][0]) for i in types_field.data]
    normal = {t: i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.NORMAL}
    ranks = {(a, b): r for r, (a, b) in enumerate(m.split(" ") for m in merges)}
    data_dir = resources.files("cecai_converter") / "data"
    texts = [*tests, (data_dir / "tokenizer_corpus.txt").read_text(encoding="utf-8"),
             *json.loads((data_dir / "parity_corpus.json").read_text(encoding="utf-8"))["strings"]]  # fmt: skip
    normalizer = normalizers.NFC()
    split = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    seen: set[str] = set(pre_tokenizers.ByteLevel.alphabet())
    for text in texts:
        for word, _span in split.pre_tokenize_str(normalizer.normalize_str(text)):
            _bpe_history(word, ranks, seen)
    kept = sorted((normal[t], t) for t in seen)
    kept_merges = [m for m in merges if all(part in seen for part in (*m.split(" "), m.replace(" ", "")))]
    vocab = {t: i for i, t in kept}
    tok = _qwen2_tokenizer(vocab, kept_merges)
    for text, ids in zip(tests, expected, strict=False):
        if tok.encode(text, add_special_tokens=False).ids != ids:
            raise ValueError(f"the Qwen2 vocabulary subset does not reproduce llama.cpp's ids for {text[:40]!r}")
    return {
        "about": "A subset of Qwen2's byte-level BPE vocabulary at Qwen2's own ids, for the qwen2 test model "
        "(cecai_converter.modelgen): the byte tokens and every token and merge Qwen2's BPE passes through on "
        "llama.cpp's tokenizer tests and this package's tokenizer and parity corpora. Regenerate with "
        "cecai_converter.modelgen.write_qwen2_vocab_data.",
        "source": f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (sha256 {SDIST_SHA256}): "
        f"vendor/llama.cpp/{QWEN2_VOCAB_MEMBER}",
        "vocab": [[t, i] for i, t in kept],
        "merges": kept_merges,
    }


def write_qwen2_vocab_data(sdist: Path, path: Path) -> Path:
    """Write :func:`qwen2_vocab_data` to ``path`` as the package ships it (one entry a line); return ``path``."""
    data = qwen2_vocab_data(sdist)
    lines = [
        "{",
        f' "about": {json.dumps(data["about"])},',
        f' "source": {json.dumps(data["source"])},',
        ' "vocab": [',
        ",\n".join(f"  {json.dumps(entry, ensure_ascii=False)}" for entry in data["vocab"]),
        " ],",
        ' "merges": [',
        ",\n".join(f"  {json.dumps(m, ensure_ascii=False)}" for m in data["merges"]),
        " ]",
        "}",
    ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def _write_qwen2_tokenizer(out_dir: Path) -> None:
    """Qwen2's tokenizer files: tokenizer.json (the shipped vocabulary subset) and tokenizer_config.json."""
    data = json.loads((resources.files("cecai_converter") / "data" / QWEN2_VOCAB_DATA).read_text(encoding="utf-8"))
    tok = _qwen2_tokenizer({str(t): int(i) for t, i in data["vocab"]}, [str(m) for m in data["merges"]])
    tok.save(str(out_dir / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in QWEN2_SPECIAL_TOKENS.items()}  # fmt: skip
    # As Qwen2's instruct models have it: no BOS added, <|im_end|> ends a turn, <|endoftext|> pads.
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
             "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
             "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
             "chat_template": QWEN2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "errors": "replace",
             "model_max_length": 2048, "split_special_tokens": False},
            indent=2, ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )  # fmt: skip


def _config(arch: str, size: _Size, dtype: str) -> Any:
    import transformers as tf

    common: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    cfg: Any  # one of transformers' config classes, chosen by ``arch``
    if arch == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
            max_position_embeddings=2048, rms_norm_eps=1e-5, **common,
        )  # fmt: skip
    elif arch == "qwen2":
        # Qwen2's vocabulary size and special-token ids (the tokenizer is a subset of Qwen2's, see the module
        # docstring), its output tied to the embedding as in Qwen2-0.5B: one 151936-row matrix, not two.
        cfg = tf.Qwen2Config(
            vocab_size=QWEN2_VOCAB_SIZE, hidden_size=size.hidden, intermediate_size=size.intermediate,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
            max_position_embeddings=2048, rms_norm_eps=1e-6, use_sliding_window=False,
            bos_token_id=QWEN2_SPECIAL_TOKENS["<|endoftext|>"], eos_token_id=QWEN2_SPECIAL_TOKENS["<|im_end|>"],
            tie_word_embeddings=True,
        )  # fmt: skip
    elif arch == "phi3":
        cfg = tf.Phi3Config(
            vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
            max_position_embeddings=2048, original_max_position_embeddings=2048, rms_norm_eps=1e-5,
            pad_token_id=0, sliding_window=None, **common,
        )  # fmt: skip
    elif arch == "gpt2-bpe":
        cfg = tf.GPT2Config(
            vocab_size=size.vocab, n_embd=size.hidden, n_layer=size.layers, n_head=size.heads,
            n_positions=1024, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        cfg.n_ctx = 1024  # llama.cpp's GPT-2 converter reads the old key
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    cfg.dtype = dtype  # transformers >= 4.56 names it dtype (torch_dtype is deprecated: a warning on every build)
    return cfg


def _save_quietly(model: Any, out_dir: Path) -> None:
    """``save_pretrained`` in safetensors, without transformers' "Writing model shards" progress bar (the demo and
    the tests print our own progress; the bar's state is transformers' global, so it is put back)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def build_model(
    out_dir: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: str = "float32",
    size: str = "tiny",
) -> Path:
    """Write a random-weight Hugging Face model folder (config, safetensors, tokenizer) to ``out_dir``.

    The same arguments give the same bytes. ``out_dir`` is replaced if it exists.

    Args:
        out_dir: the folder to create.
        arch: ``llama``, ``phi3`` (SentencePiece tokenizer), ``qwen2`` (a subset of Qwen2's byte-level BPE, at
            Qwen2's vocabulary size whatever ``size`` says) or ``gpt2-bpe`` (a BPE tokenizer that llama.cpp's
            converter does not recognise).
        seed: the weights' random seed.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the stored weights.
        size: a key of :data:`SIZES`.
    """
    import torch
    import transformers as tf

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cfg = _config(arch, SIZES[size], dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = tf.AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
        # Plain N(0, 0.02) weights and unit norms, whatever each class's own init does, so that every architecture
        # produces logits of a similar, finite scale.
        gen = torch.Generator().manual_seed(seed)
        for name, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name or "ln_" in name else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        model = model.to(torch_dtype)
    _save_quietly(model, out_dir)
    # transformers writes generation_config.json with its own version in it; it is not a conversion input.
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    if arch == "gpt2-bpe":
        _train_bpe(out_dir)
    elif arch == "qwen2":
        _write_qwen2_tokenizer(out_dir)
    else:
        _train_sentencepiece(out_dir)
    if arch == "phi3":
        # transformers 5 ignores a phi3 folder's tokenizer_class and builds a generic tokenizer from the
        # SentencePiece model, normalizer and all (newlines become spaces), which is not what llama.cpp reads from
        # it. A tokenizer.json written by LlamaTokenizer is what it then loads: the same tokenizer as the GGUF's.
        tf.LlamaTokenizer.from_pretrained(str(out_dir)).backend_tokenizer.save(str(out_dir / "tokenizer.json"))
        # As in Phi-3's own tokenizer.json: "</s>" eats the spaces after it. llama.cpp gives the token that
        # attribute for every model named phi3 (llama-vocab.cpp), so without it the two would split text apart.
        tokenizer = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
        for token in tokenizer.get("added_tokens", []):
            if token.get("content") == "</s>":
                token["rstrip"] = True
        (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    return out_dir


def make_seed_layout(
    root: Path,
    *,
    model_name: str = "tiny-llama",
    precisions: dict[str, list[str]] | None = None,
    arch: str = "llama",
    size: str = "tiny",
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Create ``root/Converter`` in the established layout with a freshly built model; return the Converter folder.

    Args:
        root: the ``<NAME>`` folder (``GPT_2``); created if missing.
        model_name: MODEL_NAME, the model's folder under ``models/``.
        precisions: PRECISION per pair; default ``{DEFAULT_PAIR: list(DEFAULT_PRECISIONS)}`` (CPU_LLM_LLAMA: Q8_0,
            Q4_K_M).
    """
    precisions = precisions or {DEFAULT_PAIR: list(DEFAULT_PRECISIONS)}
    converter = Path(root) / "Converter"
    config_dir = converter / "configurations"
    config_dir.mkdir(parents=True, exist_ok=True)
    general = {
        "IMAGE_NAME": "ghcr.io/cecai/cecai-converter:0.1.0-cpu",
        "MODEL_NAME": model_name,
        "TRAINED": False,
        "MODELS_PATH": "../models",
        "LOGS_PATH": "../logs",
        "OUTPUTS_PATH": "../outputs",
    }
    (config_dir / "converter_args.yaml").write_text(yaml.safe_dump(general, sort_keys=False))
    for pair, values in precisions.items():
        pair_dir = config_dir / pair
        pair_dir.mkdir(exist_ok=True)
        (pair_dir / f"converter_args_{pair.lower()}.yaml").write_text(
            yaml.safe_dump({"PRECISION": values if len(values) != 1 else values[0]}, sort_keys=False)
        )
    build_model(converter / "models" / model_name, arch, seed=seed, dtype=dtype, size=size)
    return converter


#: The towers :func:`build_model_with_tower` can announce (what no file of a conversion would hold).
TOWERS: Final = ("audio", "mtp")


def build_vision_model(out_dir: Path, *, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a tiny random-weight ``Gemma3ForConditionalGeneration`` (text tower, SigLIP vision tower, projector).

    Built with transformers' own config classes (Gemma3Config, Gemma3TextConfig, SiglipVisionConfig) and saved as
    checkpoints on the Hub are laid out: transformers 5 writes the vision tower under its internal names
    (``vision_tower.embeddings.*``), which the pinned converter cannot map, so they are renamed to
    ``vision_tower.vision_model.*``. With a SentencePiece tokenizer (the converter's Gemma 3 path) and a
    ``preprocessor_config.json`` (64×64 images, mean and std 0.5, 4 image tokens). The same arguments give the same
    bytes; ``out_dir`` is replaced if it exists.
    """
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    image_size, patch_size, image_tokens = 64, 16, 4
    text = tf.Gemma3TextConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        # llama.cpp scales queries by 1/sqrt(head_dim), as Gemma 3 checkpoints do (query_pre_attn_scalar =
        # head_dim); a window wider than any evaluated text keeps both runtimes out of their edge cases.
        query_pre_attn_scalar=64, sliding_window=2048,
    )  # fmt: skip
    vision = tf.SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size, vision_use_head=False,
    )  # fmt: skip
    # Image token ids inside the small vocabulary (the real model's 255999… would be out of range).
    cfg = tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=image_tokens, boi_token_index=3,
        eoi_token_index=4, image_token_index=5,
    )  # fmt: skip
    cfg.dtype = dtype
    torch.manual_seed(seed)
    with torch.no_grad():
        model: Any = tf.Gemma3ForConditionalGeneration(cfg)
        gen = torch.Generator().manual_seed(seed)
        for name, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                # Gemma's RMSNorm multiplies by (1 + weight): 0 is the unit norm there; SigLIP's LayerNorm by weight.
                gemma_norm = "language_model" in name or "soft_emb_norm" in name
                unit = name.endswith("weight") and "norm" in name and not gemma_norm
                param.fill_(1.0 if unit else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        model = model.to(torch_dtype)
    _save_quietly(model, out_dir)
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    # The Hub layout: vision_tower.vision_model.*, no pooling head, one file.
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is no mapping)
                tensors[key] = fh.get_tensor(key)
        path.unlink()
    (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    renamed = {}
    for key, tensor in sorted(tensors.items()):
        if key.startswith("vision_tower.head."):
            continue
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        renamed[key] = tensor.contiguous()
    save_file(renamed, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
             "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 2,
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": image_tokens},
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    _train_sentencepiece(out_dir, gemma=True)
    return out_dir


def build_model_with_tower(out_dir: Path, tower: str, *, seed: int = 0) -> Path:
    """A tiny Llama whose ``config.json`` also announces a tower no conversion file would hold.

    ``audio``: an ``audio_config`` (as audio-language checkpoints have); ``mtp``: ``num_nextn_predict_layers``
    (multi-token-prediction heads). The weights stay the text model's, so ``--text-only`` converts it.
    """
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; choose from {', '.join(TOWERS)}")
    build_model(out_dir, "llama", seed=seed)
    config_path = Path(out_dir) / "config.json"
    config = json.loads(config_path.read_text())
    if tower == "audio":
        config["audio_config"] = {"model_type": "whisper", "d_model": 64, "encoder_layers": 2, "num_mel_bins": 80}
    else:
        config["num_nextn_predict_layers"] = 1
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
