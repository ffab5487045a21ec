"""Property tests (Hypothesis) of every reader of untrusted bytes: the safetensors header and index, the batch file,
the Converter configuration, ``reference.json``, check records (also through ``card``), ``--request``,
``manifest.json`` (also through ``report``), GGUF headers (through ``verify`` and ``report``) and the Hub's answers
(the stand-in in ``hub_stand_in.py``: the Hub is not reachable from the test machines).

Every generated input must give either a :class:`ConverterError` with exit code 1 or 2 (a clear message, never a
traceback; exit 2 for the input files) or a result that is correct, and nothing is written outside the folder it
works in. The number of examples is bounded so that this runs in seconds in CI; ``nox -s fuzz`` (or
``CECAI_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``) runs 5,000 examples of each property.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cecai_converter.batch import load_batch
from cecai_converter.errors import ConverterError
from cecai_converter.names import check_plain_name, check_stem, control_character
from cecai_converter.source import check_model_dir

FUZZ = settings(
    max_examples=int(os.environ.get("CECAI_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,  # no .hypothesis/ folder in the checkout; failures print their example (and @reproduce_failure)
    suppress_health_check=[HealthCheck.too_slow],
)

#: Any JSON value, small.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
#: Dtypes the safetensors library and the checker both know, and some they do not.
DTYPES = st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I64", "F64", "BOOL", "Q4_0", "f32", ""])
DIMS = st.integers(min_value=-2, max_value=9) | st.sampled_from([2**31, 2**62, 2**64]) | JSON
OFFSETS = st.lists(st.integers(min_value=-4, max_value=300), max_size=3) | JSON
TENSOR = st.fixed_dictionaries(
    {"dtype": DTYPES | JSON, "shape": st.lists(DIMS, max_size=3) | JSON, "data_offsets": OFFSETS}
)
HEADER = st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "__metadata__"), TENSOR | JSON,
                         max_size=4)  # fmt: skip

CONFIG = {"architectures": ["LlamaForCausalLM"]}


def _model(folder: Path, weights: bytes) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def _library_accepts(data: bytes) -> bool | None:
    """What the safetensors library says of these bytes (the converter reads weights with it); None if absent."""
    try:
        from safetensors import deserialize
    except ImportError:
        return None
    try:
        deserialize(data)
    except Exception:  # the library's own SafetensorError, or any other refusal
        return False
    return True


def _exit_code_ok(exc: ConverterError) -> bool:
    return exc.exit_code in (1, 2) and bool(exc.message) and "Traceback" not in exc.message


def _judge(header: object, data_len: int) -> None:
    """The reader refuses the file clearly or accepts it, exactly when the safetensors library does."""
    raw = json.dumps(header).encode()
    weights = struct.pack("<Q", len(raw)) + raw + bytes(data_len)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            source = check_model_dir(_model(Path(tmp) / "m", weights))
        except ConverterError as exc:
            assert _exit_code_ok(exc), exc
            accepted = False
        else:
            assert source.weights == ("model.safetensors",)
            accepted = True
    library = _library_accepts(weights)
    if library is not None:
        # The same rules as the library that reads the weights: never accept what it refuses, nor the reverse
        # (for the dtypes it knows).
        assert accepted == library, (header, data_len)


@FUZZ
@given(header=HEADER, data_len=st.integers(min_value=0, max_value=300))
def test_safetensors_header_is_refused_clearly_or_matches_the_library(header, data_len):
    _judge(header, data_len)


#: Bytes per element of the dtypes the structured files use.
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I64": 8, "F64": 8, "BOOL": 1}


@st.composite
def near_valid_files(draw: st.DrawFn) -> tuple[dict, int]:
    """A valid header (tensors tiling the data section), then at most two mutations of one field."""
    header: dict = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = _SIZES[dtype]
        for dim in shape:
            size *= dim
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data_len = offset
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 2))):
        what = draw(st.sampled_from(["offset", "shape", "dim", "dtype", "length", "entry"]))
        if what == "length" or not names:
            data_len = max(0, data_len + draw(st.integers(-8, 8)))
            continue
        name = draw(st.sampled_from(names))
        entry = header[name]
        if what == "offset":
            entry["data_offsets"][draw(st.integers(0, 1))] = draw(st.integers(-2, offset + 8) | JSON)
        elif what == "shape":
            entry["shape"] = draw(st.lists(DIMS, max_size=3) | JSON)
        elif what == "dim" and isinstance(entry["shape"], list) and entry["shape"]:  # an earlier draw may be JSON
            entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(DIMS)
        elif what == "dtype":
            entry["dtype"] = draw(DTYPES | JSON)
        elif what == "entry":
            header[name] = draw(JSON)
            names.remove(name)
    return header, data_len


@FUZZ
@given(case=near_valid_files())
def test_near_valid_safetensors_are_judged_like_the_library(case):
    _judge(*case)


@FUZZ
@given(weights=st.binary(max_size=64) | st.builds(lambda n, b: struct.pack("<Q", n) + b,
                                                  st.integers(0, 2**64 - 1), st.binary(max_size=64)))  # fmt: skip
def test_safetensors_bytes_never_crash_the_reader(weights):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            check_model_dir(_model(Path(tmp) / "m", weights))
        except ConverterError as exc:
            assert _exit_code_ok(exc)
        else:
            assert _library_accepts(weights) is not False


SHARDS = st.sampled_from(
    ["model.safetensors", "other.safetensors", "../outside.safetensors", "/etc/passwd", "sub/model.safetensors",
     ".", "", "model.safetensors\n", "config.json"]
) | JSON  # fmt: skip


@FUZZ
@given(index=st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=6), SHARDS, max_size=4) | JSON})
       | JSON)  # fmt: skip
def test_safetensors_index_names_only_files_inside_the_folder(index):
    good = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "outside.safetensors").write_bytes(b"x")
        folder = _model(Path(tmp) / "m", struct.pack("<Q", len(good)) + good + bytes(8))
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        try:
            check_model_dir(folder)
        except ConverterError as exc:
            assert _exit_code_ok(exc)
        else:
            shards = index["weight_map"].values() if isinstance(index, dict) else []
            for shard in shards:
                assert check_plain_name(shard) is None and (folder / shard).is_file()
                assert (folder / shard).resolve().parent == folder.resolve()


# ------------------------------------------------------------------------------------------- the batch file

TEXT = st.text(max_size=16) | st.sampled_from(
    ["o/m", "owner/Model-1.5", "models/a\n::warning::x", "main\r\n", "x\u2028y", "../up", "/abs", ".", "Q8_0",
     "cpu", "gpu", "q4_k_m", "a b"]
)  # fmt: skip
VALUE = TEXT | st.lists(TEXT, max_size=3) | JSON
MODEL = st.dictionaries(
    st.sampled_from(["repo", "path", "revision", "name", "precisions", "pairs", "nmae"]), VALUE, max_size=5
)
BATCH = st.dictionaries(
    st.sampled_from(["version", "defaults", "runner-labels", "models", "modles"]),
    st.lists(MODEL, max_size=3)
    | st.dictionaries(st.sampled_from(["precisions", "pairs", "cpu", "gpu"]), VALUE, max_size=2)
    | VALUE,
    max_size=4,
)


GOOD = {
    "repo": st.sampled_from(["o/m", "owner/Model-1.5", "o/m2"]),
    "path": st.sampled_from(["models/a", "b", "models/c.d"]),
    "revision": st.sampled_from(["main", "fe8a4ea1ffedaf415f4da2f062534de366a451e6"]),
    "name": st.sampled_from(["x", "model-1", "M.v2"]),
    "precisions": st.sampled_from(["Q8_0", ["q4_k_m", "F16"]]),
    "pairs": st.sampled_from(["cpu", ["gpu", "arm"]]),
}


@st.composite
def near_valid_batches(draw: st.DrawFn) -> dict:
    """A batch whose keys are mostly right and whose values are mostly good, some replaced by hostile ones."""

    def value(key: str) -> object:
        return draw(GOOD[key]) if draw(st.integers(0, 7)) else draw(VALUE)

    models = []
    for _ in range(draw(st.integers(1, 3))):
        model = {("repo" if draw(st.booleans()) else "path"): None}
        for key in draw(st.sets(st.sampled_from(["revision", "name", "precisions", "pairs"]))):
            model[key] = None
        models.append({key: value(key if key in GOOD else "name") for key in model})
    doc: dict = {"models": models}
    if draw(st.booleans()):
        doc["defaults"] = {"precisions": value("precisions"), "pairs": value("pairs")}
    if draw(st.integers(0, 3)) == 0:
        doc["runner-labels"] = {"cpu": draw(st.sampled_from([["self-hosted", "x64"], ["lin ux"], ["a\n"]]) | VALUE)}
    return doc


@FUZZ
@given(data=near_valid_batches())
def test_near_valid_batch_files_are_refused_clearly_or_valid(data):
    _check_batch_file(yaml.safe_dump(data, allow_unicode=True))


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    return []


def _check_batch_file(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conversions.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            batch = load_batch(path)
        except ConverterError as exc:
            assert exc.exit_code == 2 and exc.message, exc
            return
    assert batch.models
    for model in batch.models:
        assert check_stem(model.name, "name") == model.name
        assert model.source in ("hub", "local") and model.precisions and model.pairs
        for value in (model.model, model.revision or "", *_strings(batch.runner_labels)):
            assert control_character(value) is None, value


@FUZZ
@given(data=BATCH)
def test_batch_file_is_refused_clearly_or_valid(data):
    _check_batch_file(yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(text=st.text(max_size=200))
def test_batch_file_text_is_refused_clearly_or_valid(text):
    _check_batch_file(text)


# ---------------------------------------------------------------------------------- the Converter configuration

GENERAL = st.dictionaries(
    st.sampled_from(["MODEL_NAME", "OUTPUTS_PATH", "LOGS_PATH", "MODELS_PATH", "TRAINED", "THRESHOLDS", "MODLE_NAME"]),
    st.sampled_from(["m", "org/m", ".", "..", "../out", "../models/m/out", "a b", "x\n::warning::y", "/abs"]) | VALUE,
    max_size=4,
)


@FUZZ
@given(general=GENERAL)
def test_converter_configuration_is_refused_clearly_or_safe(general):
    from cecai_converter.config import load_converter_dir

    with tempfile.TemporaryDirectory() as tmp:
        converter = Path(tmp) / "Converter"
        pair = converter / "configurations" / "CPU_LLM_LLAMA"
        pair.mkdir(parents=True)
        (converter / "configurations" / "converter_args.yaml").write_text(yaml.safe_dump(general, allow_unicode=True))
        (pair / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: Q8_0\n")
        try:
            (job,) = load_converter_dir(converter)
        except ConverterError as exc:
            assert exc.exit_code == 2 and exc.message
            return
        assert check_stem(job.stem, "stem") == job.stem
        assert job.model_dir.is_relative_to((converter / "models").resolve()) or "MODELS_PATH" in general
        assert not job.outputs_dir.is_relative_to(job.model_dir) and not job.logs_dir.is_relative_to(job.model_dir)


# --------------------------------------------- issue 16: reference.json, check records, requests, manifests, GGUF,
# --------------------------------------------- and the Hub's answers

#: JSON values a hostile writer picks: out-of-range numbers, wrong types, non-finite floats, long strings.
HOSTILE = (
    st.sampled_from([-1, -(2**31), 2**31, 2**63, 10**30, 0.5, -0.0, True, False, None, "", "0", "../x", "a\nb"])
    | st.floats()
    | JSON
)
#: Raw text that is JSON-shaped but broken: deep nesting, truncation, constants, huge integers.
RAW_JSON = (
    st.text(max_size=40)
    | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
    | st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n)
    | st.sampled_from(["NaN", "[Infinity]", '{"schema": 1, "tokens": ' + "9" * 5000 + "}", '"\\ud800"', "{", ""])
)


def _input_error(exc: ConverterError) -> None:
    """An input error: exit 2, a message, no traceback text."""
    assert exc.exit_code == 2 and exc.message and "Traceback" not in exc.message, (type(exc), exc.exit_code, exc)


def _mutate(draw: st.DrawFn, value: object, depth: int = 0) -> object:
    """``value`` with one leaf (or one container) somewhere inside replaced by a hostile value."""
    if depth > 6 or not isinstance(value, (dict, list)) or not value or draw(st.integers(0, 4)) == 0:
        return draw(HOSTILE)
    if isinstance(value, dict):
        key = draw(st.sampled_from(sorted(value, key=str)))
        if draw(st.integers(0, 9)) == 0:
            return {k: v for k, v in value.items() if k != key}  # a key dropped
        return {**value, key: _mutate(draw, value[key], depth + 1)}
    index = draw(st.integers(0, len(value) - 1))
    if draw(st.integers(0, 9)) == 0:
        return value[:index] + value[index + 1 :]  # an item dropped
    return [*value[:index], _mutate(draw, value[index], depth + 1), *value[index + 1 :]]


@contextlib.contextmanager
def _sandbox() -> Iterator[Path]:
    """A work folder next to a sentinel folder: whatever runs in ``work`` must leave the rest untouched."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "outside").mkdir()
        (root / "outside" / "sentinel").write_text("x")
        (root / "work").mkdir()
        yield root / "work"
        assert sorted(p.name for p in root.iterdir()) == ["outside", "work"]
        assert [p.name for p in (root / "outside").iterdir()] == ["sentinel"]
        assert (root / "outside" / "sentinel").read_text() == "x"


def _cli(*argv: object) -> int:
    """``cecai-convert ARGV`` in process: the exit code; a traceback (any other exception) fails the property."""
    from cecai_converter import cli

    with mock.patch.dict(os.environ, {}, clear=False):
        os.environ.pop("GITHUB_STEP_SUMMARY", None)  # report appends to the job summary where this is set
        try:
            return cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own usage errors
            return int(exc.code or 0)


# ---- reference.json

_REF_VOCAB, _REF_CONTEXT, _REF_NAME = 40, 64, "m.q8_0.gguf"


def _write_gguf(path: Path, *, n_vocab: int = _REF_VOCAB, context_length: int | None = _REF_CONTEXT) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="llama")
    if context_length is not None:
        writer.add_context_length(context_length)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((n_vocab, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_GGUF_DIR = Path(tempfile.mkdtemp(prefix="cecai-fuzz-gguf-"))
_REF_GGUF = _write_gguf(_GGUF_DIR / _REF_NAME)
_GGUF_BYTES = _REF_GGUF.read_bytes()


@st.composite
def references(draw: st.DrawFn) -> object:
    """A reference as the builder writes it (some shapes at the limits), then mutated at most twice."""
    from cecai_converter.agreement import TOP_K

    n = draw(st.sampled_from([8, 9, 16, 64, 65, 128, 129]) | st.integers(0, 20))
    width = draw(st.sampled_from([TOP_K, min(TOP_K, _REF_VOCAB)]) | st.integers(0, TOP_K + 2))
    row_ids = list(range(width))
    row_lps = [round(-4.0 - 0.25 * j, 6) for j in range(width)]
    data: object = {
        "schema": 1,
        "tokens": [draw(st.integers(0, _REF_VOCAB - 1)) for _ in range(n)],
        "top_k": TOP_K,
        "runtime": {"device": "cpu"},
        "files": {_REF_NAME: {"ids": [row_ids] * n, "logprobs": [row_lps] * n, "sha256": "ab" * 32}},
    }
    for _ in range(draw(st.integers(0, 2))):
        data = _mutate(draw, data)
    return data


def _judge_reference(text: str | bytes) -> None:
    from cecai_converter.agreement import MIN_TOKENS, N_POSITIONS, TOP_K, check_reference_fits, read_reference

    with _sandbox() as work:
        path = work / "reference.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            reference = read_reference(path)
            check_reference_fits(reference, _REF_NAME, _REF_GGUF)
        except ConverterError as exc:
            _input_error(exc)
            return
    # Accepted: everything the agreement worker relies on holds, so its work is bounded and its numbers real.
    tokens, top_k = reference["tokens"], reference["top_k"]
    assert 1 <= top_k <= TOP_K
    if reference["files"]:
        assert MIN_TOKENS <= len(tokens) <= min(N_POSITIONS, _REF_CONTEXT)
    entry = reference["files"].get(_REF_NAME)
    if entry is None:
        return
    assert all(type(t) is int and 0 <= t < _REF_VOCAB for t in tokens)
    assert len(entry["ids"]) == len(entry["logprobs"]) == len(tokens)
    for ids, lps in zip(entry["ids"], entry["logprobs"], strict=True):
        assert len(ids) == len(lps) == min(top_k, _REF_VOCAB) and len(set(ids)) == len(ids)
        assert all(type(t) is int and 0 <= t < _REF_VOCAB for t in ids)
        assert all(math.isfinite(v) and v <= 1e-6 for v in lps) and lps == sorted(lps, reverse=True)
        assert sum(math.exp(v) for v in lps) <= 1.001


@FUZZ
@given(data=references())
def test_reference_json_is_refused_clearly_or_safe_for_the_worker(data):
    _judge_reference(json.dumps(data))


@FUZZ
@given(text=RAW_JSON | st.binary(max_size=64).map(bytes))
def test_reference_json_bytes_are_refused_clearly(text):
    _judge_reference(text)


# ---- check records


def _good_record() -> dict:
    return {
        "schema": 1, "tool": {"name": "cecai-converter", "version": "0"}, "pair": "CPU_LLM_LLAMA",
        "model_name": "m", "passed": True, "runtime": {"device": "cpu", "machine": "x86_64"},
        "reference_runtime": {"device": "cpu"}, "limits": {"max_kld": 0.01, "min_top1": 0.9}, "problems": [],
        "files": [{"name": _REF_NAME, "precision": "Q8_0", "sha256": "ab" * 32, "sha256_match": True,
                   "generated_tokens": 4, "passed": True, "problems": [],
                   "agreement": {"kld_mean": 0.0, "kld_max": 0.0, "top1_agreement": 1.0, "n_positions": 16,
                                 "prompt_tps": 1.0, "gen_tps": 1.0, "peak_rss_mib": 1.0, "offloaded_layers": 0,
                                 "total_layers": 2}}],
    }  # fmt: skip


@st.composite
def records(draw: st.DrawFn) -> object:
    data: object = _good_record()
    for _ in range(draw(st.integers(0, 2))):
        data = _mutate(draw, data)
    return data


def _manifest_for_card(folder: Path) -> None:
    entry = {"name": _REF_NAME, "precision": "Q8_0", "bytes": 3, "sha256": "ab" * 32}
    (folder / "manifest.json").write_text(json.dumps({"schema": 1, "model_name": "m", "pair": None, "files": [entry]}))


@FUZZ
@given(record=records() | RAW_JSON)
def test_check_records_are_refused_clearly_or_read_and_rendered(record):
    from cecai_converter.records import read_records

    text = record if isinstance(record, str) else json.dumps(record)
    with _sandbox() as work:
        path = work / "m.cpu.check.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            (read,) = read_records([path])
        except ConverterError as exc:
            _input_error(exc)
        else:
            assert read.to_dict() == json.loads(text)
        # The same bytes through `card --checks` (read, merged by pair, rendered into a Markdown table).
        _manifest_for_card(work)
        assert _cli("card", work, "--checks", path, "-o", work / "README.md") in (0, 2)


# ---- --request / CECAI_REQUEST


def _good_request() -> dict:
    from cecai_converter.request import resolve

    return resolve({}, {}, {}, command="convert").record()


@st.composite
def requests(draw: st.DrawFn) -> object:
    data: object = _good_request()
    for _ in range(draw(st.integers(0, 2))):
        data = _mutate(draw, data)
    return data


@FUZZ
@given(request=requests() | RAW_JSON)
def test_requests_are_refused_clearly_or_round_trip(request):
    from cecai_converter.request import Request, load_request

    text = request if isinstance(request, str) else json.dumps(request)
    with _sandbox() as work:
        path = work / "request.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        for load in (lambda: load_request(str(path)), lambda: Request.from_json(text, "CECAI_REQUEST")):
            try:
                loaded = load()
            except ConverterError as exc:
                _input_error(exc)
            else:
                again = Request.from_json(loaded.to_json())
                assert again.values == loaded.values and again.sources == loaded.sources


# ---- manifest.json (and through `report`)


def _good_manifest() -> dict:
    return {
        "schema": 1, "tool": {"name": "cecai-converter", "version": "0"}, "model_name": "m", "pair": None,
        "base": {"precision": "F16", "kept": False}, "timings": {"total_s": 1.0},
        "files": [{"name": _REF_NAME, "precision": "Q8_0", "bytes": len(_GGUF_BYTES), "sha256": "ab" * 32,
                   "fidelity": {"kld_mean": 0.01, "ppl_delta_pct": 1.0, "top1_agreement": 0.9, "gen_tps": 5.0}}],
    }  # fmt: skip


@st.composite
def manifests(draw: st.DrawFn) -> object:
    data: object = _good_manifest()
    for _ in range(draw(st.integers(0, 2))):
        data = _mutate(draw, data)
    return data


@FUZZ
@given(manifest=manifests() | RAW_JSON)
def test_manifests_are_refused_clearly_or_read_and_reported(manifest):
    from cecai_converter.manifest import Manifest, load_manifest

    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    with _sandbox() as work:
        path = work / "manifest.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        (work / _REF_NAME).write_bytes(_GGUF_BYTES)
        try:
            loaded = load_manifest(path)
        except ConverterError as exc:
            _input_error(exc)
        else:
            assert Manifest.from_dict(loaded.to_dict()).to_dict() == loaded.to_dict()  # what it reads, it keeps
        assert _cli("report", work) in (0, 2)


# ---- GGUF headers through `verify` and `report`


@st.composite
def damaged_ggufs(draw: st.DrawFn) -> bytes:
    """A real GGUF file with some header bytes changed, a length field set to a hostile value, or cut short."""
    data = bytearray(_GGUF_BYTES)
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["byte", "u64", "u32", "cut"]))
        if len(data) < 8:
            break
        pos = draw(st.integers(0, min(len(data), 400) - 8))
        if what == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif what == "u64":
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
            data[pos : pos + 8] = struct.pack("<Q", value)
        elif what == "u32":
            data[pos : pos + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        else:
            del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@FUZZ
@given(gguf=damaged_ggufs() | st.binary(max_size=64).map(lambda b: b"GGUF" + b))
def test_damaged_gguf_headers_are_refused_clearly_by_verify_and_report(gguf):
    with _sandbox() as work:
        path = work / _REF_NAME
        path.write_bytes(gguf)
        assert _cli("verify", "--no-load", path) in (0, 1, 2)
        (work / "manifest.json").write_text(json.dumps(_good_manifest()))
        assert _cli("report", work) in (0, 2)
        assert path.read_bytes() == gguf  # read, never rewritten


# ---- the Hub's answers (stand-in: the Hub is not reachable from the test machines)

SHAS = st.sampled_from(["../../escape", "..", "/abs/path", "0" * 40, "a" * 39, "A" * 40, "main", "", "g" * 40,
                        "0" * 40 + "/..", "\u0660" * 40]) | st.text(max_size=44)  # fmt: skip
HUB_NAMES = st.sampled_from(["config.json", "model.safetensors", "../x.json", "../../x.safetensors", "/etc/x.json",
                             "a/../../b.json", "sub/tokenizer.json", ".json", "x\\..\\y.json", "tokenizer.model"]
                            ) | st.text(max_size=12).map(lambda s: s + ".json")  # fmt: skip
HUB_FUZZ = settings(FUZZ, max_examples=int(os.environ.get("CECAI_FUZZ_EXAMPLES", "25")))


@pytest.fixture(scope="module")
def hub_stand_in() -> Iterator[Any]:
    from hub_stand_in import HubStandIn

    with HubStandIn() as server:
        yield server


@HUB_FUZZ
@given(sha=SHAS | st.just(None), names=st.lists(HUB_NAMES, max_size=4, unique=True))
def test_hub_stand_in_answers_are_refused_clearly_or_stay_in_the_download_root(hub_stand_in, sha, names):
    """The Hub's answers (a commit id, file names) are input: a result inside the root or a clear error."""
    from huggingface_hub import constants

    from cecai_converter.source import fetch_from_hub

    repo_id = "octo/fuzz"
    with _sandbox() as work:
        model = work / "published"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(CONFIG))
        repo = hub_stand_in.add_repo(repo_id, model, extra_files={n: b"{}" for n in names})
        if sha is not None:  # the endpoint answers this commit id for `main` (and serves files under it)
            repo.sha, repo.refs = sha, {"main": sha}
        root = work / "downloads"
        endpoint = hub_stand_in.endpoint
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        with (
            mock.patch.object(constants, "ENDPOINT", endpoint),
            mock.patch.object(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template),
            mock.patch.dict(os.environ, {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}),
        ):
            os.environ.pop("HF_TOKEN", None)
            try:
                folder, resolved = fetch_from_hub(repo_id, "main", root)
            except ConverterError as exc:
                assert exc.exit_code in (1, 2) and exc.message and "Traceback" not in exc.message
            else:
                assert re.fullmatch(r"[0-9a-f]{40}", resolved), resolved
                assert folder.resolve().is_relative_to(root.resolve())
                for item in folder.rglob("*"):
                    assert item.resolve().is_relative_to(root.resolve()), item
