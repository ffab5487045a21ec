"""The base GGUF against its source model (source_parity.py): real transformers and real llama-cpp-python on models
built by modelgen and converted by the pinned converter.

A faithful base passes with its numbers recorded; a broken one fails, each for its own stated reason: two vocabulary
tokens swapped, the rope frequency base or the norm epsilon changed (edited in place with gguf-py's GGUFReader "r+",
as llama.cpp's gguf_set_metadata does), a source whose added token the GGUF does not have, a chat template changed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cecai_converter import source_parity
from cecai_converter.errors import ConfigError, ManifestError, UsageError
from cecai_converter.fidelity import validate_thresholds
from cecai_converter.gguf_header import read_header
from cecai_converter.manifest import Manifest
from cecai_converter.source_parity import check_source, nmse, not_checked, rating, summary

#: A small chat template with tools, as a chat model's tokenizer_config.json carries one.
TEMPLATE = (
    "{%- if tools %}{{ '<|system|>\nTools: ' + (tools | tojson) + eos_token + '\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.tool_calls %}{%- for c in m.tool_calls %}"
    "{{ '<|assistant|>\n<call>' + (c.function | tojson) + '</call>' + eos_token + '\n' }}{%- endfor %}"
    "{%- else %}{{ '<|' + m.role + '|>\n' + m.content + eos_token + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)


def _convert(model_dir: Path, outfile: Path, outtype: str) -> Path:
    """A GGUF of ``model_dir`` made by the pinned converter, as the pipeline runs it."""
    from cecai_converter.convert import run_converter
    from cecai_converter.source import check_model_dir
    from cecai_converter.toolchain import ensure_converter

    run_converter(ensure_converter(), check_model_dir(model_dir), outfile, outtype, model_name=model_dir.name)
    return outfile


def _set_scalar(path: Path, key: str, value: float) -> None:
    """Change one scalar of a GGUF's metadata in place (llama.cpp's gguf_set_metadata does the same)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()


def _swap_tokens(path: Path, first: str, second: str) -> None:
    """Swap two equal-length strings of ``tokenizer.ggml.tokens`` in place: the vocabulary's ids 'first' and 'second'
    trade their text."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    field = reader.fields["tokenizer.ggml.tokens"]
    parts = {bytes(field.parts[i]).decode("utf-8"): field.parts[i] for i in field.data}
    a, b = parts[first], parts[second]
    assert len(a) == len(b), "the swap is done in place: the two strings must have one length"
    saved = a.copy()
    a[:] = b
    b[:] = saved
    reader.data.flush()


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- pure functions ------------------------------------------------------------------------------------------------


def test_nmse_is_llama_cpps_check_nmse() -> None:
    import numpy as np

    ref = np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    test = ref + np.array([[0.1, 0.0, -0.1], [0.0, 0.2, 0.0]])
    # examples/model-conversion/scripts/utils/check-nmse.py: mean((test - ref)²) / var(ref)
    assert nmse(ref, test) == pytest.approx(np.mean((test - ref) ** 2) / np.var(ref))
    assert nmse(ref, ref) == 0.0
    assert nmse(np.ones(4), np.ones(4) * 2) == float("inf")
    assert rating(0.0) == "perfect" and rating(5e-5) == "excellent" and rating(5e-3) == "good"
    assert rating(0.5) == "poor"


def test_a_source_entry_in_thresholds_sets_the_parity_limits() -> None:
    assert validate_thresholds({"source": {"max_nmse": 1e-3}, "q8_0": {"max_kld": 0.1}}) == {
        "source": {"max_nmse": 1e-3},
        "Q8_0": {"max_kld": 0.1},
    }
    with pytest.raises(ConfigError, match="source: unknown limit 'max_ppl'"):
        validate_thresholds({"Source": {"max_ppl": 1}})
    with pytest.raises(ConfigError, match=r"source\.max_nmse must be a number"):
        validate_thresholds({"source": {"max_nmse": "small"}})


def test_the_manifest_holds_the_record_and_refuses_a_malformed_one() -> None:
    record = not_checked("turned off (--no-source-check)").to_dict()
    manifest = Manifest.from_dict({"schema": 1, "source_parity": record})
    assert manifest.source_parity == record and manifest.to_dict()["source_parity"] == record
    with pytest.raises(ManifestError, match=r"source_parity\.checked: expected true or false"):
        Manifest.from_dict({"schema": 1, "source_parity": {"checked": "yes"}})
    with pytest.raises(ManifestError, match=r"source_parity\.skipped_reason: a record that was not checked must say"):
        Manifest.from_dict({"schema": 1, "source_parity": {"checked": False}})
    assert summary(record) == "not checked: turned off (--no-source-check)"


def test_the_ram_budget_variable_is_a_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(source_parity.RAM_BUDGET_ENV, "1.5G")
    assert source_parity.ram_budget() == int(1.5 * 2**30)
    monkeypatch.setenv(source_parity.RAM_BUDGET_ENV, "lots")
    with pytest.raises(UsageError, match="CECAI_SOURCE_RAM_BUDGET='lots' is not a size"):
        source_parity.ram_budget()
    monkeypatch.delenv(source_parity.RAM_BUDGET_ENV)
    assert source_parity.ram_budget() > 0  # MemAvailable


# --- real models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_base(model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama and its F32 base GGUF (tests copy the GGUF before breaking it)."""
    model = model_factory("llama")
    return model, _convert(model, tmp_path_factory.mktemp("parity") / "llama.f32.gguf", "f32")


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "dtype"), [("llama", "bfloat16"), ("qwen2", "float16"), ("phi3", "bfloat16")])
def test_every_architecture_converts_faithfully(
    arch: str, dtype: str, model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    model = model_factory(arch, dtype=dtype)
    base = _convert(model, tmp_path / f"{arch}.gguf", {"bfloat16": "bf16", "float16": "f16"}[dtype])
    record = check_source(model, base)
    logits = record.logits or {}
    assert record.checked and logits["status"] == "compared", record
    # llama.cpp calls an NMSE below 1e-4 an excellent conversion; these 16-bit bases are far below it.
    assert logits["nmse"] < 1e-4 and logits["top1_agreement"] > 0.9 and logits["n_tokens"] == 128, logits
    assert record.hyperparameters is not None and not record.hyperparameters["differing"]
    assert "rope frequency base" in record.hyperparameters["compared"]
    assert record.passed, record.failures
    tokenizer = record.tokenizer or {}
    assert tokenizer["n_differing"] == 0 and tokenizer["n_strings"] > 60 and tokenizer["add_special"]["equal"]
    if arch == "qwen2":
        # Qwen2's byte-level BPE, recognised by the converter (tokenizer.ggml.pre = qwen2): no BOS on the source
        # side (bos_token null) and none added by the GGUF; <|im_end|> ends a turn; the ChatML template renders alike.
        assert tokenizer["bos"]["source"] is None and tokenizer["add_special"]["gguf"] == [9707, 1879]
        assert tokenizer["eos"] == {"source": 151645, "gguf": 151645}
        assert record.chat_template is not None and record.chat_template["status"] == "equal"
        assert record.chat_template["renders"] == {"chat": "equal"}
        assert logits["n_vocab"] == 151936
        assert read_header(base).metadata["tokenizer.ggml.pre"] == "qwen2"
        return
    assert record.chat_template == {"status": "none", "names": [], "renders": {}}
    assert tokenizer["bos"] == {"source": 1, "gguf": 1}


@pytest.mark.slow
def test_a_faithful_base_passes_and_records_its_numbers(llama_base: tuple[Path, Path]) -> None:
    model, base = llama_base
    record = check_source(model, base)
    assert record.passed and not record.failures
    logits = record.logits or {}
    assert logits["nmse"] < 1e-4 and logits["rating"] in ("essentially identical", "excellent")
    assert 0 <= logits["kld_mean"] < 1e-4 and logits["kld_mean_se"] >= 0 and logits["top1_agreement"] == 1.0
    tokenizer = record.tokenizer or {}
    # llama.cpp's SentencePiece space prefix (a leading space, text after a special token) is told apart
    assert tokenizer["n_differing"] == 0 and tokenizer["n_space_prefix"] > 0
    assert tokenizer["space_prefix_example"]["text"].startswith(" ")
    assert json.loads(json.dumps(record.to_dict())) == record.to_dict()


@pytest.mark.slow
def test_two_swapped_vocabulary_tokens_are_caught(llama_base: tuple[Path, Path], tmp_path: Path) -> None:
    model, base = llama_base
    broken = shutil.copy(base, tmp_path / "swapped.gguf")
    _swap_tokens(Path(broken), "or", "ld")  # both in "Hello world"
    record = check_source(model, Path(broken))
    assert not record.passed
    tokenizer = record.tokenizer or {}
    assert tokenizer["n_differing"] > 0
    first = tokenizer["first_difference"]
    assert first["source"] != first["gguf"]
    assert record.failures[0].startswith("the GGUF's tokenizer differs from the source's on ")
    assert f"{first['text'][:20]}" in record.failures[0].replace("\\n", "\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("llama.rope.freq_base", 500000.0, "the rope frequency base differs: source 10000"),
        ("llama.attention.layer_norm_rms_epsilon", 0.25, "the RMS norm epsilon differs: source 1e-05"),
    ],
)
def test_a_changed_hyperparameter_is_named(
    llama_base: tuple[Path, Path], tmp_path: Path, key: str, value: float, named: str
) -> None:
    model, base = llama_base
    broken = Path(shutil.copy(base, tmp_path / "changed.gguf"))
    _set_scalar(broken, key, value)
    record = check_source(model, broken)
    assert not record.passed
    assert any(f.startswith(named) and key in f for f in record.failures), record.failures
    assert (record.tokenizer or {})["n_differing"] == 0  # the tokenizer is not to blame


@pytest.mark.slow
def test_a_changed_norm_epsilon_shows_in_the_logits(llama_base: tuple[Path, Path], tmp_path: Path) -> None:
    model, base = llama_base
    broken = Path(shutil.copy(base, tmp_path / "eps.gguf"))
    _set_scalar(broken, "llama.attention.layer_norm_rms_epsilon", 10.0)
    record = check_source(model, broken, limits={"max_nmse": 1e-4})
    logits = record.logits or {}
    assert logits["nmse"] > 1e-4
    assert any(f.startswith("the GGUF's logits differ from the source's: nmse ") for f in record.failures)


@pytest.mark.slow
def test_a_chat_template_is_compared_and_rendered(model_factory: Callable[..., Path], tmp_path: Path) -> None:
    model = _copy(model_factory("llama"), tmp_path / "chat-llama")
    _edit_json(model / "tokenizer_config.json", chat_template=TEMPLATE)
    base = _convert(model, tmp_path / "chat.gguf", "f32")
    record = check_source(model, base)
    assert record.passed, record.failures
    assert record.chat_template == {
        "status": "equal", "names": ["default"], "templates": {"default": "equal"},
        "renders": {"chat": "equal", "tool call": "equal"},
    }  # fmt: skip
    _edit_json(model / "tokenizer_config.json", chat_template=TEMPLATE.replace("<|assistant|>", "<|bot|>"))
    record = check_source(model, base)
    assert not record.passed
    assert "the chat template tokenizer.chat_template is different from the source's" in record.failures
    assert any(f.startswith("the chat conversation renders differently") and "<|bot|>" in f for f in record.failures)
    assert any(f.startswith("the tool call conversation renders differently") for f in record.failures)


@pytest.mark.slow
def test_remote_code_is_never_run_without_the_opt_in(llama_base: tuple[Path, Path], tmp_path: Path) -> None:
    model, base = llama_base
    custom = _copy(model, tmp_path / "custom")
    _edit_json(
        custom / "config.json",
        model_type="cecai_custom",
        architectures=["CecaiCustomForCausalLM"],
        auto_map={"AutoConfig": "configuration_custom.C", "AutoModelForCausalLM": "modeling_custom.CecaiCustom"},
    )
    record = check_source(custom, base)
    logits = record.logits or {}
    assert logits["status"] == "skipped"
    assert "modeling_custom.CecaiCustom" in logits["reason"] and "--trust-remote-code" in logits["reason"]
    assert record.passed and (record.tokenizer or {})["status"] == "compared"  # the rest is still compared
    assert "logits not compared (the model needs the repository's own code" in summary(record.to_dict())


@pytest.mark.slow
def test_a_source_too_large_for_the_budget_is_skipped_with_the_reason(
    llama_base: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, base = llama_base
    monkeypatch.setenv(source_parity.RAM_BUDGET_ENV, "1M")
    record = check_source(model, base)
    logits = record.logits or {}
    assert logits["status"] == "skipped" and "CECAI_SOURCE_RAM_BUDGET" in logits["reason"]
    assert "GiB in float32" in logits["reason"] and record.passed


# --- the pipeline --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_conversion_records_parity_and_reuses_it(cli: Any, tiny_llama: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    args = ["convert", tiny_llama, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity", "--format", "json"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((outdir / "manifest.json").read_text())
    record = manifest["source_parity"]
    assert record["checked"] and record["passed"] and record["base"] == f"{tiny_llama.name}.q8_0.gguf"
    assert record["logits"]["nmse"] < 1e-2 and record["tokenizer"]["n_differing"] == 0
    assert manifest["timings"]["source_check_s"] > 0
    # a second conversion into another folder reuses the file, and the record of the base it came from
    other = tmp_path / "other"
    again = cli(*[a if a != outdir else other for a in args])
    assert again.returncode == 0, again.stderr
    reused = json.loads((other / "manifest.json").read_text())["source_parity"]
    assert reused["base_inputs_key"] == record["base_inputs_key"]
    shown = cli(*[a for a in args if a not in ("--format", "json")])  # unchanged: no work, the same summary
    assert shown.returncode == 0, shown.stderr
    assert "  source check: passed, NMSE " in shown.stdout and "tokenizer 0/" in shown.stdout


@pytest.mark.slow
def test_the_check_can_be_turned_off_and_says_so(cli: Any, tiny_llama: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    result = cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity", "--no-source-check")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert manifest["source_parity"] == {
        "checked": False,
        "skipped_reason": "turned off (--no-source-check, SOURCE_CHECK: false or CECAI_SOURCE_CHECK=0)",
        "passed": None, "failures": [], "base": None, "tokenizer": None, "chat_template": None,
        "hyperparameters": None, "logits": None, "trust_remote_code": False, "timings": None,
    }  # fmt: skip
    assert manifest["request"]["values"]["source_check"] is False
    # the summary a person reads says so next to the files, not only the manifest
    assert "  source check: not checked: turned off (--no-source-check" in result.stdout
    assert manifest["request"]["sources"]["source_check"] == "cli"
    assert "comparing the base with the source" not in result.stderr


@pytest.mark.slow
def test_an_added_token_the_gguf_lacks_fails_the_run_and_publishes_nothing(
    cli: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    # transformers adds <|tool|> (id 400); the converter's SentencePiece path does not read this key, so the GGUF
    # splits the text into pieces: the tokenizers differ on the token, alone and inside text.
    model = _copy(tiny_llama, tmp_path / "added")
    _edit_json(model / "tokenizer_config.json", additional_special_tokens=["<|tool|>"])
    outdir = tmp_path / "out"
    result = cli("convert", model, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity")
    assert result.returncode == 1, result.stderr
    assert "error: the GGUF is not faithful to its source: the GGUF's tokenizer differs from the source's on 3 of" in (
        result.stderr
    )
    assert "first: '<|tool|>' source [400] gguf [" in result.stderr
    assert not list(outdir.glob("*.gguf")) and not (outdir / "manifest.json").exists()
    assert not [p for p in outdir.iterdir() if p.name != ".cecai.lock"]


@pytest.mark.slow
def test_a_failed_conversion_ends_the_source_side_started_beside_it(
    cli: Any, model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    # The source side starts before the converter; gpt2-bpe's tokenizer makes the converter give up half way.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = cli(
        "convert", model_factory("gpt2-bpe"), "--precision", "Q8_0", "--outdir", tmp_path / "out", "--no-fidelity",
        env={"TMPDIR": str(scratch)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "pre-tokenizer" in result.stderr and "comparing the base with the source" not in result.stderr
    assert not list(scratch.glob("cecai-parity-*")), "the source side's worker and its files were left behind"
    jobs = [p for p in Path("/proc").glob("[0-9]*") if str(scratch) in _cmdline(p)]
    assert not jobs, "a source-side worker outlived the run"


# --- the qwen2 fixture: Qwen2's own byte-level BPE, which the pinned converter recognises ---------------------------


@pytest.mark.slow
def test_the_qwen2_fixture_tokenizes_as_qwen2_for_the_converters_pre_tokenizer_hash(
    model_factory: Callable[..., Path],
) -> None:
    # The converter names a BPE pre-tokenizer by hashing the ids a tokenizer gives one fixed text (get_vocab_base_pre)
    # and refuses an unknown hash; the qwen2 fixture must give the hash it knows as Qwen2's, through transformers.
    from transformers import AutoTokenizer

    from cecai_converter.modelgen import QWEN2_SPECIAL_TOKENS
    from cecai_converter.toolchain import ensure_converter

    code = (ensure_converter(fetch=False) / "conversion" / "base.py").read_text(encoding="utf-8")
    text_line = re.search(r"^\s*chktxt = ('.*')$", code, re.MULTILINE)
    assert text_line is not None, "the pinned converter no longer hashes a chktxt"
    chktxt = ast.literal_eval(text_line.group(1))
    known = dict(re.findall(r'if chkhsh == "([0-9a-f]{64})":(?:\n\s*#[^\n]*)*\n\s*res = "([^"]+)"', code))
    assert len(known) > 50
    tok = AutoTokenizer.from_pretrained(model_factory("qwen2"), local_files_only=True)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert known[hashlib.sha256(str(tok.encode(chktxt)).encode()).hexdigest()] == "qwen2"
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN2_SPECIAL_TOKENS} == QWEN2_SPECIAL_TOKENS
    assert tok.bos_token_id is None and tok.eos_token_id == QWEN2_SPECIAL_TOKENS["<|im_end|>"]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>")[0] == QWEN2_SPECIAL_TOKENS["<|im_start|>"]


@pytest.mark.slow
def test_the_shipped_qwen2_vocabulary_is_what_the_pinned_sources_give(tmp_path: Path) -> None:
    # Rebuilt from llama.cpp's copy of Qwen2's vocabulary in the pinned sdist; qwen2_vocab_data itself refuses a
    # subset that does not give llama.cpp's recorded ids on each of its tokenizer tests.
    from importlib import resources

    from cecai_converter.modelgen import QWEN2_VOCAB_DATA, write_qwen2_vocab_data
    from cecai_converter.toolchain import sdist_path

    rebuilt = write_qwen2_vocab_data(sdist_path(fetch=False), tmp_path / "qwen2_vocab.json")
    shipped = resources.files("cecai_converter") / "data" / QWEN2_VOCAB_DATA
    assert rebuilt.read_bytes() == shipped.read_bytes(), (
        "data/qwen2_vocab.json is not what the pinned sources and the shipped corpora give (a corpus changed?): "
        "rewrite it with cecai_converter.modelgen.write_qwen2_vocab_data(toolchain.sdist_path(), PATH)"
    )
    data = json.loads(rebuilt.read_text(encoding="utf-8"))
    assert len(data["vocab"]) > 1000 and len(data["merges"]) > 1000
    assert [t for t, i in data["vocab"]][:3] == ["!", '"', "#"]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
