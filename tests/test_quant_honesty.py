"""Quantization honesty: every quantized file records the tensor types llama.cpp really wrote, the bits per weight
of its tensor data and every fallback to another type than the recipe asked for; per-tensor overrides
(TENSOR_TYPES / --tensor-type PATTERN=TYPE) reach the real quantizer, the manifest, reproduce and the published
--tensor-type-file map. Real converter and quantizer on modelgen models, real files read back with gguf's reader."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cecai_converter.errors import ConfigError, ManifestError, UsageError
from cecai_converter.manifest import Manifest
from cecai_converter.quant_types import (
    parse_fallbacks,
    parse_rule,
    parse_rules,
    quantization_record,
    recorded_tensor_types,
    tensor_type_file,
    types_markdown,
)
from cecai_converter.request import resolve

CONFIG_DIR = Path("/cfg/configurations")


def _gguf_types(path: Path) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Tensor name → type name, and the histogram, as gguf-py's own reader sees the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    hist: dict[str, dict[str, int]] = {}
    for t in reader.tensors:
        row = hist.setdefault(t.tensor_type.name, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += int(t.n_bytes)
    return names, hist


def _convert(cli: Callable[..., Any], model: Path, out: Path, *extra: str, precision: str = "Q4_K_M") -> dict[str, Any]:
    result = cli(
        "convert", model, "--precision", precision, "--outdir", out, "--model-name", "tiny",
        "--no-fidelity", "--no-reference", "--threads", "1", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return manifest


# -- the overrides: parsing and checking ----------------------------------------------------------------------------
def test_an_override_is_normalised_as_llama_quantize_reads_it() -> None:
    assert parse_rule("ffn_down=q8_0", "X") == "ffn_down=Q8_0"
    assert parse_rule(r"blk\.[0-3]\.attn_v=q6_k", "X") == r"blk\.[0-3]\.attn_v=Q6_K"
    assert parse_rule("attn_(q|k)=iq4_nl", "X") == "attn_(q|k)=IQ4_NL"
    assert parse_rule(r"(?:attn_v|ffn_(?!gate))=q8_0", "X") == r"(?:attn_v|ffn_(?!gate))=Q8_0"
    assert parse_rule(r"\(?x=q8_0", "X") == r"\(?x=Q8_0"  # an optional literal parenthesis, no group
    assert parse_rules({"ffn_down": "Q8_0", "attn_v": "f16"}, "X") == ("ffn_down=Q8_0", "attn_v=F16")
    assert parse_rules("a=q8_0\n b=q4_k", "X") == ("a=Q8_0", "b=Q4_K")
    assert tensor_type_file(("a=Q8_0", "b=Q4_K")) == "a=Q8_0\nb=Q4_K\n"


@pytest.mark.parametrize(
    ("entry", "phrase"),
    [
        ("ffn_down", "is not PATTERN=TYPE"),
        ("=q8_0", "has an empty pattern"),
        ("ffn_down=", "has an empty type"),
        ("ffn_down=q9_9", "names the type 'q9_9', which llama.cpp's quantizer cannot write"),
        ("ffn_down=q8_1", "cannot write"),  # a dot-product helper type, no weight type
        ("blk.(0=q8_0", "is not a regular expression"),
        ("FFN_down=q8_0", "has capital letters"),
        ("(?P<x>ffn)=q8_0", "no named groups, look-behind or inline flags"),
        ("(?i)ffn_down=q8_0", "do not have: only (?:…)"),  # Python takes it, std::regex throws mid-quantization
        ("(?<=blk)ffn=q8_0", "do not have"),
    ],
)
def test_a_bad_override_is_refused_naming_the_entry(entry: str, phrase: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_rule(entry, "CECAI_TENSOR_TYPES")
    assert info.value.message.startswith("CECAI_TENSOR_TYPES: ") and phrase in info.value.message


def test_every_source_of_the_option_reaches_the_request() -> None:
    from cecai_converter.cli import build_parser

    def flags(*extra: str) -> Any:
        return build_parser().parse_args(["run", "/cfg", *extra])

    cli = resolve(flags("--tensor-type", "ffn_down=q8_0", "--tensor-types", "attn_v=q6_k"), {}, {})
    assert (cli["tensor_types"], cli.sources["tensor_types"]) == (("ffn_down=Q8_0", "attn_v=Q6_K"), "cli")
    env = resolve(flags(), {}, {"CECAI_TENSOR_TYPES": "ffn_down=q8_0 attn_v=q6_k"})
    assert env["tensor_types"] == ("ffn_down=Q8_0", "attn_v=Q6_K")
    yaml_list = resolve(flags(), {"TENSOR_TYPES": ["ffn_down=q8_0"]}, {}, config_dir=CONFIG_DIR)
    assert (yaml_list["tensor_types"], yaml_list.sources["tensor_types"]) == (("ffn_down=Q8_0",), "yaml")
    default = resolve(flags(), {}, {})
    assert default["tensor_types"] is None and default.to_options().tensor_types == ()
    # The request a container receives carries it, and reads it back checked.
    from cecai_converter.request import Request

    assert Request.from_json(cli.to_json()) == cli
    assert cli.to_options().tensor_types == ("ffn_down=Q8_0", "attn_v=Q6_K")


def test_a_bad_override_in_yaml_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        resolve({}, {"TENSOR_TYPES": ["ffn_down=nope"]}, {}, config_dir=CONFIG_DIR, yaml_where="converter_args.yaml")
    assert info.value.message.startswith("converter_args.yaml: TENSOR_TYPES: ") and "'nope'" in info.value.message
    with pytest.raises(ConfigError, match=r"TENSOR_TYPES must be a list"):
        resolve({}, {"TENSOR_TYPES": 3}, {}, config_dir=CONFIG_DIR)


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--tensor-type", "ffn_down=q9_9"], {}, "--tensor-type"),
        (["--tensor-types", "blk.(=q8_0"], {}, "--tensor-type"),
        ([], {"CECAI_TENSOR_TYPES": "ffn_down=q8_0 attn_v=bogus"}, "CECAI_TENSOR_TYPES"),
    ],
)
def test_a_bad_override_exits_2_before_any_work(
    cli: Callable[..., Any], tiny_llama: Path, tmp_path: Path, args: list[str], env: dict[str, str], names: str
) -> None:
    result = cli("convert", tiny_llama, "--precision", "Q4_K_M", "--outdir", tmp_path / "o", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert names in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


# -- the record: parsing llama.cpp's log, checking manifests ---------------------------------------------------------
#: The lines llama-quant.cpp's tensor_type_fallback writes (three log calls make one line), copied from the
#: pinned sources' format strings.
_LOG = (
    "[   3/  30]                  blk.0.ffn_down.weight - [  320,   256,     1,     1], type =    f32, \n"
    "warning: blk.0.ffn_down.weight                - ncols    320 not divisible by 256 (required for type    q6_K) "
    "-> falling back to    q8_0\n"
    "warning: blk.1.ffn_down.weight                - ncols     40 not divisible by 256 (required for type    q4_K) "
    "(WARNING: must use F16 due to unusual shape) -> falling back to     f16\n"
    "llama_model_quantize_impl: WARNING: 2 of 30 tensor(s) required fallback quantization\n"
)


def test_fallbacks_are_read_from_the_quantizers_own_words() -> None:
    assert parse_fallbacks(_LOG) == [
        {"tensor": "blk.0.ffn_down.weight", "asked": "Q6_K", "written": "Q8_0",
         "reason": "row length 320 is not a multiple of 256, the block size of Q6_K"},
        {"tensor": "blk.1.ffn_down.weight", "asked": "Q4_K", "written": "F16",
         "reason": "row length 40 is not a multiple of 256, the block size of Q4_K, nor of the fallback's block "
                   "size: F16 is the last resort"},
    ]  # fmt: skip
    assert parse_fallbacks("[ 1/ 2] output.weight - [256, 1024], type = f32, converting to q6_K .. done\n") == []


def _entry(quantization: object) -> dict[str, Any]:
    return {"schema": 1, "files": [{"name": "a.gguf", "precision": "Q4_K_M", "bytes": 1, "sha256": "x",
                                    "quantization": quantization}]}  # fmt: skip


@pytest.mark.parametrize(
    ("quantization", "field"),
    [
        ([], "files[0].quantization: expected an object"),
        ({"types": [], "fallbacks": [], "overrides": []}, "files[0].quantization.types"),
        ({"types": {"Q4_K": {"tensors": "2", "bytes": 3}}, "fallbacks": [], "overrides": []}, ".types.Q4_K"),
        ({"types": {}, "bpw": "4", "fallbacks": [], "overrides": []}, ".bpw"),
        ({"types": {}, "fallbacks": [{"tensor": "t"}], "overrides": []}, ".fallbacks[0]"),
        ({"types": {}, "fallbacks": [], "overrides": [3]}, ".overrides"),
    ],
)
def test_a_malformed_record_is_refused_naming_the_field(quantization: object, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(_entry(quantization))
    assert field in info.value.message


def test_a_sound_record_round_trips_and_reproduce_reads_its_overrides() -> None:
    record = {"types": {"Q8_0": {"tensors": 2, "bytes": 10}}, "bpw": 8.5,
              "fallbacks": [], "overrides": ["ffn_down=Q8_0"]}  # fmt: skip
    data = _entry(record)
    assert Manifest.from_dict(data).to_dict() == data
    assert recorded_tensor_types(data) == ("ffn_down=Q8_0",)
    # A manifest from an older run records the request only; a tampered one is refused like the option.
    assert recorded_tensor_types({"request": {"values": {"tensor_types": ["attn_v=q6_k"]}}}) == ("attn_v=Q6_K",)
    with pytest.raises(UsageError, match=r"quantization\.overrides"):
        recorded_tensor_types(_entry({**record, "overrides": ["x=q9"]}))


# -- real conversions ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_q4_k_m_file_records_what_llama_cpp_wrote(cli: Callable[..., Any], tiny_llama: Path, tmp_path: Path) -> None:
    manifest = _convert(cli, tiny_llama, tmp_path / "out")
    (entry,) = manifest["files"]
    path = tmp_path / "out" / entry["name"]
    _, hist = _gguf_types(path)
    q = entry["quantization"]
    assert q["types"] == hist  # the histogram is the file's, tensor for tensor and byte for byte
    assert {"Q4_K", "Q6_K", "F32"} <= q["types"].keys()  # a K-quant mix: Q6_K for the raised tensors, F32 norms
    tensor_bytes = sum(row["bytes"] for row in hist.values())
    assert q["bpw"] == round(tensor_bytes * 8 / entry["n_params"], 3)
    # The whole file's bpw (metadata and vocabulary included) is the same computation on the file's size.
    assert entry["bpw"] == round(path.stat().st_size * 8 / entry["n_params"], 3) > q["bpw"]
    assert q["fallbacks"] == [] and q["overrides"] == []  # a width of 256: every row fits a K-quant block
    report = cli("report", tmp_path / "out")
    assert report.returncode == 0, report.stderr
    assert f"- `{entry['name']}`: Q4_K ×" in report.stdout and "no fallback" in report.stdout
    # `verify` says the same of any GGUF, without a manifest.
    verified = cli("--format", "json", "verify", "--no-load", path)
    assert verified.returncode == 0, verified.stderr
    (row,) = json.loads(verified.stdout)
    assert (row["tensor_types"], row["tensor_bpw"]) == (hist, q["bpw"]) and "tensors" not in row


@pytest.mark.slow
def test_rows_k_quants_cannot_hold_are_recorded_as_fallbacks(
    cli: Callable[..., Any], model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    model = model_factory("llama", size="tiny-odd-ffn")  # FFN width 320: ffn_down rows are 320 long
    result = cli("convert", model, "--precision", "Q4_K_M", "--outdir", tmp_path / "out", "--model-name", "tiny",
                 "--no-fidelity", "--no-reference", "--threads", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Q4_K_M: 2 tensor(s) written in another type than the recipe asks" in result.stderr  # said, not only filed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (entry,) = manifest["files"]
    names, hist = _gguf_types(tmp_path / "out" / entry["name"])
    q = entry["quantization"]
    assert q["types"] == hist
    fallbacks = {f["tensor"]: f for f in q["fallbacks"]}
    ffn_down = sorted(n for n in names if "ffn_down" in n)
    assert sorted(fallbacks) == ffn_down  # exactly the tensors whose rows are 320 long, no others
    for name, f in fallbacks.items():
        # The recipe's own type (Q4_K, or Q6_K where Q4_K_M raises ffn_down) is "asked"; what the file holds is
        # "written", as the reader sees it: Q5_0 for Q4_K, Q8_0 for Q6_K (llama-quant.cpp's table).
        assert (f["asked"], f["written"]) in {("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")}, f
        assert f["written"] == names[name]
        assert "row length 320 is not a multiple of 256" in f["reason"]
    assert manifest["files"][0]["bpw"] > q["bpw"]
    report = cli("report", tmp_path / "out")
    assert f"{len(ffn_down)} fallback(s)" in report.stdout and "asked Q" in report.stdout


@pytest.mark.slow
def test_an_override_reaches_the_file_the_manifest_the_card_and_reproduce(
    cli: Callable[..., Any], tiny_llama: Path, tmp_path: Path
) -> None:
    model = tmp_path / "tiny-src"
    shutil.copytree(tiny_llama, model)
    out = tmp_path / "out"
    plain = _convert(cli, model, tmp_path / "plain")
    manifest = _convert(cli, model, out, "--tensor-type", "ffn_down=q8_0", "--tensor-type", r"attn_v=q8_0")
    (entry,) = manifest["files"]
    names, _ = _gguf_types(out / entry["name"])
    overridden = {n: t for n, t in names.items() if "ffn_down" in n or "attn_v" in n}
    assert len(overridden) == 4 and set(overridden.values()) == {"Q8_0"}
    plain_names, _ = _gguf_types(tmp_path / "plain" / entry["name"])
    assert Counter(plain_names[n] for n in overridden) != Counter(overridden.values())  # the recipe alone differs
    assert entry["quantization"]["overrides"] == ["ffn_down=Q8_0", "attn_v=Q8_0"]
    assert manifest["request"]["values"]["tensor_types"] == ["ffn_down=Q8_0", "attn_v=Q8_0"]
    assert entry["inputs_key"] != plain["files"][0]["inputs_key"]  # another override re-quantizes
    # The map llama-quantize reads with --tensor-type-file, and the card that names it.
    assert (out / "tiny.tensor-types.txt").read_text() == "ffn_down=Q8_0\nattn_v=Q8_0\n"
    card = cli("card", out)
    assert card.returncode == 0, card.stderr
    text = (out / "README.md").read_text()
    assert "`tiny.tensor-types.txt`" in text and "--tensor-type ffn_down=Q8_0 --tensor-type attn_v=Q8_0" in text
    assert "Tensor types as written:" in text
    # Publishing takes the map along, checked against the manifest.
    from cecai_converter.release.assets import collect_assets

    assets = {a.name: a.kind for a in collect_assets([out])}
    assert assets["tiny.tensor-types.txt"] == "tensor-types"
    (out / "tiny.tensor-types.txt").write_text("ffn_down=Q4_K\n")
    with pytest.raises(UsageError, match="holds other overrides"):
        collect_assets([out])
    (out / "tiny.tensor-types.txt").write_text(tensor_type_file(["ffn_down=Q8_0", "attn_v=Q8_0"]))
    # reproduce quantizes again with the recorded overrides: the same bytes.
    result = cli("reproduce", out / "manifest.json", "--workdir", tmp_path / "work", "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 1 file(s) rebuilt to the recorded bytes" in result.stdout


@pytest.mark.slow
def test_an_override_is_never_lost_to_a_direct_conversion(
    cli: Callable[..., Any], tiny_llama: Path, tmp_path: Path
) -> None:
    # Q8_0 alone is written by the converter directly, which knows no overrides: with TENSOR_TYPES it is quantized.
    manifest = _convert(cli, tiny_llama, tmp_path / "out", "--tensor-type", "ffn_down=q4_0", precision="Q8_0")
    (entry,) = manifest["files"]
    assert manifest["base"]["precision"] != "Q8_0"
    names, _ = _gguf_types(tmp_path / "out" / entry["name"])
    assert {t for n, t in names.items() if "ffn_down" in n} == {"Q4_0"}
    assert {t for n, t in names.items() if "attn_q" in n} == {"Q8_0"}
    assert entry["quantization"]["overrides"] == ["ffn_down=Q4_0"]


def test_the_report_lists_types_and_fallbacks_from_a_record() -> None:
    from cecai_converter.gguf_header import TensorInfo

    tensors = [TensorInfo("a", (256, 4), 12, 0), TensorInfo("b", (320, 4), 6, 0), TensorInfo("n", (256,), 0, 0)]
    fallback = {"tensor": "b", "asked": "Q4_K", "written": "Q5_0", "reason": "row length 320 …"}
    record = quantization_record(tensors, fallbacks=[fallback], overrides=["b=Q4_K"])
    assert record["types"] == {
        "F32": {"tensors": 1, "bytes": 1024},
        "Q5_0": {"tensors": 1, "bytes": 880},
        "Q4_K": {"tensors": 1, "bytes": 576},
    }
    assert record["bpw"] == round((1024 + 880 + 576) * 8 / (1024 + 1280 + 256), 3)
    lines = types_markdown([{"name": "m.gguf", "quantization": record}])
    assert lines[1] == "Tensor types as written:"
    assert lines[3].startswith("- `m.gguf`: F32 ×1 (41.3%), Q5_0 ×1 (35.5%), Q4_K ×1 (23.2%); 7.75 bits per weight")
    assert "1 fallback(s); overrides `b=Q4_K`" in lines[3]
    assert lines[4] == "  - `b`: asked Q4_K, wrote Q5_0 (row length 320 …)"
    assert types_markdown([{"name": "old.gguf"}]) == []  # a manifest from before the records: nothing to say


def test_an_override_that_needs_an_importance_matrix_is_refused_before_converting(
    cli: Callable[..., Any], tiny_llama: Path, tmp_path: Path
) -> None:
    result = cli("convert", tiny_llama, "--precision", "Q4_K_M", "--outdir", tmp_path / "o",
                 "--tensor-type", "ffn_down=iq2_xxs", "--no-fidelity")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "TENSOR_TYPES ffn_down=IQ2_XXS need(s) an importance matrix" in result.stderr
    assert "converting" not in result.stderr and not list((tmp_path / "o").glob("*.gguf"))
