"""Vision models whole (issue 15, part 2): towers found, the projector exported and shown an image, or a refusal.

The real conversions use a tiny Gemma 3 vision-language model built with transformers' own config classes
(``modelgen.build_vision_model``) and the pinned converter, quantizer and runtime; nothing is mocked.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cecai_converter.errors import UnsupportedModel, VerificationFailed
from cecai_converter.manifest import Manifest, write_manifest
from cecai_converter.multimodal import (
    Tower,
    Towers,
    describe_kinds,
    detect_towers,
    mmproj_file_name,
    mmproj_precisions,
    mtp_refusal,
    plan_towers,
    shipped_image,
)
from cecai_converter.toolchain import ensure_converter
from tests.conftest import CliResult

GEMMA3_NAMES = [
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "multi_modal_projector.mm_input_projection_weight",
    "multi_modal_projector.mm_soft_emb_norm.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
]


@pytest.fixture(scope="module")
def converter_dir() -> Path:
    return ensure_converter()


def _folder(tmp_path: Path, config: dict[str, Any], names: list[str]) -> tuple[Path, dict[str, Any]]:
    """A model folder as detect_towers reads it: config.json and a safetensors index naming the tensors."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path, config


# -- detection and the decision (fast) ---------------------------------------------------------------------------------
def test_a_gemma3_vision_model_is_found_with_its_projector(tmp_path: Path, converter_dir: Path) -> None:
    folder, config = _folder(
        tmp_path, {"architectures": ["Gemma3ForConditionalGeneration"], "vision_config": {"hidden_size": 64}},
        GEMMA3_NAMES,
    )  # fmt: skip
    towers = detect_towers(folder, config, converter_dir)
    assert towers.kinds == ["vision", "projector"]
    assert towers.projector and towers.wants_projector and towers.unconverted == ()
    vision = towers.towers[0]
    assert "config.json: vision_config" in vision.evidence and "tensors: vision_tower.* (2)" in vision.evidence
    assert plan_towers(towers, text_only=False) == {
        "towers": ["vision", "projector"], "projector": True, "text_only": False, "left_out": [],
    }  # fmt: skip


def test_a_plain_text_model_has_no_towers(tmp_path: Path, converter_dir: Path) -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    folder, config = _folder(tmp_path, {"architectures": ["LlamaForCausalLM"], "audio_config": {}}, names)
    towers = detect_towers(folder, config, converter_dir)
    assert towers.towers == () and plan_towers(towers, text_only=False) is None


def test_towers_are_found_from_tensor_names_alone_with_a_model_prefix(tmp_path: Path, converter_dir: Path) -> None:
    names = ["model.language_model.layers.0.mlp.up_proj.weight", "model.audio_tower.conv1.weight", "mtp.0.norm.weight"]
    folder, config = _folder(tmp_path, {"architectures": ["LlamaForCausalLM"]}, names)
    towers = detect_towers(folder, config, converter_dir)
    assert towers.kinds == ["audio", "mtp"] and not towers.projector


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"architectures": ["LlamaForCausalLM"], "audio_config": {"d_model": 64}},
         "an audio tower (config.json: audio_config)"),
        ({"architectures": ["SomeNewVLForConditionalGeneration"], "vision_config": {"a": 1}}, "a vision tower"),
    ],
)  # fmt: skip
def test_unconvertible_towers_are_refused_by_name(
    tmp_path: Path, converter_dir: Path, config: dict[str, Any], named: str
) -> None:
    folder, config = _folder(tmp_path, config, ["model.embed_tokens.weight"])
    towers = detect_towers(folder, config, converter_dir)
    with pytest.raises(UnsupportedModel) as caught:
        plan_towers(towers, text_only=False)
    assert named in caught.value.message and caught.value.exit_code == 2
    assert "--text-only" in (caught.value.hint or "")
    record = plan_towers(towers, text_only=True)
    assert record is not None and record["text_only"] is True and record["projector"] is False
    assert record["left_out"] == towers.kinds


def test_mtp_heads_are_refused_unless_the_converted_file_keeps_them() -> None:
    towers = Towers(
        "Gemma3ForConditionalGeneration",
        (Tower("vision", ("config.json: vision_config",)), Tower("mtp", ("config.json: num_nextn_predict_layers",))),
        projector=True,
    )
    # Before converting only the projector is decided; the text file says whether the heads are in it.
    assert plan_towers(towers, text_only=False) == {
        "towers": ["vision", "mtp"], "projector": True, "text_only": False, "left_out": [],
    }  # fmt: skip
    refusal = mtp_refusal(towers, {"general.architecture": "gemma3"}, text_only=False)
    assert refusal is not None and "multi-token-prediction heads (config.json: num_nextn_predict_layers)" in (
        refusal.message
    )
    assert refusal.exit_code == 2 and "--text-only" in (refusal.hint or "")
    assert mtp_refusal(towers, {"deepseek2.nextn_predict_layers": 1}, text_only=False) is None
    assert mtp_refusal(towers, {}, text_only=True) is None
    # Text only leaves out every tower, the projector too: the opt-in is for the text model alone.
    assert plan_towers(towers, text_only=True) == {
        "towers": ["vision", "mtp"], "projector": False, "text_only": True, "left_out": ["vision", "mtp"],
    }  # fmt: skip


def test_projector_file_names_follow_llama_cpp_discovery() -> None:
    assert mmproj_file_name("gemma-tiny", "F16") == "mmproj-gemma-tiny-f16.gguf"
    assert mmproj_precisions(["Q4_K_M"]) == ["F16"]
    assert mmproj_precisions(["Q4_K_M", "Q8_0"]) == ["F16", "Q8_0"]
    assert describe_kinds(["vision", "projector"]) == "a vision tower and a multimodal projector"


def test_the_test_image_is_a_shipped_png() -> None:
    from PIL import Image

    with Image.open(shipped_image()) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
        assert image.getpixel((32, 32))[0] > 200 > image.getpixel((32, 32))[1]  # the red square in the middle


# -- the manifest, the card, the report and publish (fast) ------------------------------------------------------------
def _mmproj_entry(name: str = "mmproj-m-f16.gguf", data: bytes = b"projector") -> dict[str, Any]:
    import hashlib

    return {"name": name, "precision": "F16", "role": "mmproj", "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "architecture": "clip", "tensor_count": 3,
            "verification": {"image": "test_image.png", "image_tokens": 4, "generated_tokens": [1, 2]}}  # fmt: skip


def test_the_manifest_round_trips_projector_files_and_refuses_a_bad_one() -> None:
    data = {"schema": 1, "model_name": "m", "files": [], "mmproj": [_mmproj_entry()],
            "multimodal": {"towers": ["vision"], "projector": True, "text_only": False, "left_out": []}}  # fmt: skip
    manifest = Manifest.from_dict(data)
    assert manifest.mmproj is not None and manifest.mmproj[0].extra == {"role": "mmproj"}
    assert manifest.to_dict() == data
    assert Manifest.from_dict({"schema": 1, "files": []}).to_dict() == {"schema": 1, "files": []}
    bad = {**data, "mmproj": [{**_mmproj_entry(), "sha256": 7}]}
    with pytest.raises(Exception, match=r"mmproj\[0\]\.sha256"):
        Manifest.from_dict(bad)
    with pytest.raises(Exception, match=r"mmproj\[0\]\.name"):
        Manifest.from_dict({**data, "mmproj": [{**_mmproj_entry(), "name": "../x.gguf"}]})


def test_card_and_report_show_the_projector_or_the_text_only_choice() -> None:
    from cecai_converter.card import multimodal_lines, render_card
    from cecai_converter.report import render_markdown

    with_projector = {"schema": 1, "model_name": "m",
                      "files": [{"name": "m.q8_0.gguf", "precision": "Q8_0", "bytes": 1, "sha256": "0" * 64}],
                      "mmproj": [_mmproj_entry()],
                      "multimodal": {"towers": ["vision", "projector"], "projector": True, "text_only": False,
                                     "left_out": []}}  # fmt: skip
    card = "\n".join(multimodal_lines(Manifest.from_dict(with_projector)))
    assert "`mmproj-m-f16.gguf`" in card and "--mmproj mmproj-m-f16.gguf" in card and "4 image tokens" in card
    assert "mmproj-m-f16.gguf" in render_markdown([Manifest.from_dict(with_projector)])
    assert "pipeline_tag: image-text-to-text" in render_card(Manifest.from_dict(with_projector))
    record = {"towers": ["audio"], "projector": False, "text_only": True, "left_out": ["audio"]}
    text_only = {**with_projector, "mmproj": None, "multimodal": record}
    card = render_card(Manifest.from_dict(text_only))
    assert "## Text only" in card and "an audio tower" in card and "--text-only" in card
    assert "Text only" in render_markdown([Manifest.from_dict(text_only)])
    assert multimodal_lines(Manifest.from_dict({"schema": 1, "files": []})) == []


def test_publish_collects_the_projector_files_as_release_assets(tmp_path: Path) -> None:
    from cecai_converter.release.assets import collect_assets
    from cecai_converter.release.manifests import release_manifest

    (tmp_path / "m.q8_0.gguf").write_bytes(b"text model")
    (tmp_path / "mmproj-m-f16.gguf").write_bytes(b"projector")
    text = {**_mmproj_entry("m.q8_0.gguf", b"text model"), "precision": "Q8_0"}
    del text["role"]
    entry = {**_mmproj_entry(), "mtime_ns": 5}
    write_manifest(tmp_path, {"model_name": "m", "files": [text], "mmproj": [entry]})
    assets = {a.name: a for a in collect_assets([tmp_path])}
    assert assets["mmproj-m-f16.gguf"].kind == "gguf" and assets["mmproj-m-f16.gguf"].precision == "mmproj F16"
    manifest = assets["m.manifest.json"].manifest
    assert manifest is not None
    published = release_manifest(manifest, []).to_dict()
    assert "mtime_ns" not in published["mmproj"][0] and published["mmproj"][0]["role"] == "mmproj"
    # A projector file that is not what its manifest says is never published.
    (tmp_path / "mmproj-m-f16.gguf").write_bytes(b"other bytes")
    with pytest.raises(Exception, match="does not match its manifest"):
        collect_assets([tmp_path])


# -- real conversions (slow) -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cecai_converter.modelgen import build_vision_model

    return build_vision_model(tmp_path_factory.mktemp("vision") / "gemma3-vl")


@pytest.fixture(scope="module")
def vision_outputs(vision_model: Path, tmp_path_factory: pytest.TempPathFactory, cli: Callable[..., CliResult]) -> Path:
    outdir = tmp_path_factory.mktemp("vision-out") / "out"
    run = cli("convert", vision_model, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity", "--threads", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    return outdir


@pytest.mark.slow
def test_a_gemma3_vision_model_converts_whole(vision_outputs: Path) -> None:
    from gguf import GGUFReader

    manifest = json.loads((vision_outputs / "manifest.json").read_text())
    assert [f["name"] for f in manifest["files"]] == ["gemma3-vl.q8_0.gguf"]
    assert manifest["multimodal"] == {
        "towers": ["vision", "projector"], "projector": True, "text_only": False, "left_out": [],
    }  # fmt: skip
    names = [e["name"] for e in manifest["mmproj"]]
    assert names == ["mmproj-gemma3-vl-f16.gguf", "mmproj-gemma3-vl-q8_0.gguf"]
    for entry in manifest["mmproj"]:
        path = vision_outputs / entry["name"]
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "clip"
        assert len(reader.tensors) == entry["tensor_count"] > 0
        assert any(t.name.startswith("v.") for t in reader.tensors)  # the vision encoder's tensors
        assert entry["role"] == "mmproj" and entry["architecture"] == "clip"
        import hashlib

        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        # The image went through the projector and the model generated after it.
        image = entry["verification"]
        assert image["image"] == "test_image.png" and image["image_tokens"] == 4 and image["runtime"] == "cpu"
        assert image["embedding_values"] == 4 * 256 and image["embedding_rms"] > 0
        assert len(image["generated_tokens"]) >= 1
    text_image = manifest["files"][0]["verification"]["image"]
    assert text_image["mmproj"] == "mmproj-gemma3-vl-f16.gguf" and text_image["generated_tokens"]
    # The text file is the text model alone: no vision tensor in it.
    text = GGUFReader(vision_outputs / "gemma3-vl.q8_0.gguf")
    assert not any(t.name.startswith("v.") or "mm." in t.name for t in text.tensors)


@pytest.mark.slow
def test_check_hashes_the_projector_and_shows_it_the_image(
    vision_outputs: Path, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(vision_outputs, folder)
    run = cli("check", folder, "--pair", "CPU_LLM_LLAMA", "--format", "json", "--threads", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((folder / "gemma3-vl.cpu.check.json").read_text())
    rows = {r["name"]: r for r in record["files"]}
    projector = rows["mmproj-gemma3-vl-f16.gguf"]
    assert projector["role"] == "mmproj" and projector["passed"] and projector["sha256_match"]
    assert projector["image"]["image_tokens"] == 4 and projector["image"]["generated_tokens"]
    # Other bytes than the builder's: the check fails and names the file.
    with (folder / "mmproj-gemma3-vl-q8_0.gguf").open("ab") as fh:
        fh.write(b"\0")
    run = cli("check", folder, "--pair", "CPU_LLM_LLAMA", "--threads", "2")
    assert run.returncode == 1
    record = json.loads((folder / "gemma3-vl.cpu.check.json").read_text())
    bad = {r["name"]: r for r in record["files"]}["mmproj-gemma3-vl-q8_0.gguf"]
    assert not bad["passed"] and not bad["sha256_match"] and "builder's" in bad["problems"][0]


@pytest.mark.slow
def test_a_text_file_is_no_projector(vision_outputs: Path) -> None:
    from cecai_converter.multimodal import image_check_many

    text = vision_outputs / "gemma3-vl.q8_0.gguf"
    with pytest.raises(VerificationFailed, match="could not answer about the test image"):
        image_check_many([(text, text)], threads=2, timeout=300)


@pytest.mark.slow
def test_reproduce_rebuilds_the_projector(
    vision_model: Path, vision_outputs: Path, cli: Callable[..., CliResult]
) -> None:
    run = cli("reproduce", vision_outputs, "--source", vision_model, "--format", "json", "--threads", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    rows = {f["name"]: f for f in result["files"]}
    assert rows["mmproj-gemma3-vl-f16.gguf"]["precision"] == "mmproj F16"
    assert result["ok"] and all(f["match"] for f in result["files"]) and len(rows) == 3


@pytest.mark.slow
def test_an_unconvertible_tower_is_refused_and_text_only_is_recorded(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    from cecai_converter.modelgen import build_model_with_tower

    model = build_model_with_tower(tmp_path / "with-audio", "audio")
    outdir = tmp_path / "out"
    run = cli("convert", model, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity")
    assert run.returncode == 2, run.stderr[-2000:]
    assert "an audio tower (config.json: audio_config)" in run.stderr and "--text-only" in run.stderr
    assert "Traceback" not in run.stderr and not list(outdir.glob("*.gguf"))
    run = cli("convert", model, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity", "--text-only",
              "--threads", "2")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert manifest["multimodal"]["text_only"] is True and manifest["multimodal"]["left_out"] == ["audio"]
    assert manifest["mmproj"] is None and manifest["request"]["values"]["text_only"] is True
    assert "text only: left out audio" in run.stdout
    card = cli("card", outdir, "-o", tmp_path / "README.md")
    assert card.returncode == 0, card.stderr
    text = (tmp_path / "README.md").read_text()
    assert "## Text only" in text and "an audio tower" in text and "--text-only" in text


@pytest.mark.slow
def test_verify_shows_the_image_through_a_projector_given_with_a_text_file(
    vision_outputs: Path, cli: Callable[..., CliResult]
) -> None:
    projector, text = vision_outputs / "mmproj-gemma3-vl-f16.gguf", vision_outputs / "gemma3-vl.q8_0.gguf"
    run = cli("verify", projector, text, "--format", "json")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {Path(r["file"]).name: r for r in json.loads(run.stdout)}
    image = rows[projector.name]["image"]
    assert rows[projector.name]["architecture"] == "clip" and image["image_tokens"] == 4 and image["generated_tokens"]
    assert "load" in rows[text.name]


@pytest.mark.slow
def test_mtp_heads_the_converter_drops_are_refused_after_converting(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    from cecai_converter.modelgen import build_model_with_tower

    model = build_model_with_tower(tmp_path / "with-mtp", "mtp")
    outdir = tmp_path / "out"
    run = cli("convert", model, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity", "--no-reference")
    assert run.returncode == 2, run.stderr[-2000:]
    assert "multi-token-prediction heads (config.json: num_nextn_predict_layers)" in run.stderr
    assert "Traceback" not in run.stderr and not list(outdir.glob("*.gguf")) and not (outdir / "manifest.json").exists()
