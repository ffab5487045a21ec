"""Property tests (Hypothesis) of readers of untrusted input: the safetensors header and index, and the batch file.

Every generated input must give either a :class:`ConverterError` with exit code 1 or 2 (a clear message, never a
traceback) or a result that is correct. The number of examples is bounded so that this runs in seconds in CI;
``CECAI_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`` runs a longer search.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

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
