"""Hostile inputs (issue 9): nothing written or uploaded outside its place, no traceback, a clear refusal.

Model folders here are written by hand (``config.json`` + a safetensors file built byte by byte), so every case is
refused before the converter would start: no torch, no conversion, seconds in all.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ggufs_under, logged, tree_digest
from github_stand_in import FakeGitHubServer
from test_publish import REPO, TOKEN, make_output, publish

from cecai_converter import gha, job_summary
from cecai_converter.batch import load_batch
from cecai_converter.config import load_converter_dir, load_yaml_mapping
from cecai_converter.errors import ConfigError, UsageError
from cecai_converter.names import check_stem
from cecai_converter.source import check_model_dir

# ------------------------------------------------------------------------------------------------ helpers


def safetensors_bytes(tensors: dict, data: bytes) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the JSON header, the data section."""
    header = json.dumps(tensors).encode()
    return struct.pack("<Q", len(header)) + header + data


EMBED = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}}


def write_model(folder: Path, *, config: dict | None = None, tensors: dict | None = None, data: bytes = b"") -> Path:
    """A Hugging Face-shaped folder whose one safetensors file matches its header (8 tokens x 4 wide, F32)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 4, **(config or {})}
    (folder / "config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors, data = EMBED, bytes(128)
    (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors, data))
    return folder


def assert_refused(result, code: int, *phrases: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def write_layout(root: Path, general: dict, precision: str = "Q8_0") -> Path:
    converter = root / "Converter"
    cfg = converter / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text(yaml.safe_dump(general))
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text(f"PRECISION: {precision}\n")
    return converter


# ---------------------------------------------------------------------------- 1. output stems from user input


def test_check_stem_accepts_repo_style_names_and_refuses_paths():
    for good in ("gpt2", "Llama-3.1-8B", "tiny_llama.v2", "x" * 96):
        assert check_stem(good, "--model-name") == good
    for bad in ("", ".", "..", ".hidden", "../x", "/abs/x", "a/b", "a\\b", "a b", "x\n::warning::y", "x" * 97, 5):
        with pytest.raises(UsageError, match="--model-name"):
            check_stem(bad, "--model-name")


@pytest.mark.parametrize("kind", ["absolute", "parent", "dot", "nested"])
def test_convert_model_name_cannot_write_outside_outdir(cli, tmp_path, kind):
    model = write_model(tmp_path / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.q8_0.gguf"
    victim.write_bytes(b"GGUF precious")
    name = {"absolute": str(elsewhere / "victim"), "parent": "../elsewhere/victim", "dot": ".", "nested": "sub/x"}
    outdir = tmp_path / "out"
    before = tree_digest(tmp_path)
    result = cli("convert", model, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity",
                 "--model-name", name[kind])  # fmt: skip
    assert_refused(result, 2, "--model-name", "cannot be a file name stem")
    assert tree_digest(tmp_path) == before  # nothing written anywhere, the victim untouched
    assert not outdir.exists()


def test_convert_refuses_a_folder_name_that_is_no_stem(cli, tmp_path):
    model = write_model(tmp_path / "my model")
    result = cli("convert", model, "--precision", "Q8_0", "--outdir", tmp_path / "out")
    assert_refused(result, 2, "the output name taken from the folder name", "pass --model-name NAME")


@pytest.mark.parametrize("name", [".", "..", "./x", "sub/..", "a b", "x\n::warning::injected", "org//x", "org/.x"])
def test_config_model_name_must_be_a_stem_or_nested_folder(tmp_path, name):
    converter = write_layout(tmp_path, {"MODEL_NAME": name})
    with pytest.raises(ConfigError, match="MODEL_NAME") as info:
        load_converter_dir(converter)
    assert "\n" not in info.value.message


def test_config_nested_model_name_uses_its_last_part_as_the_stem(tmp_path):
    converter = write_layout(tmp_path, {"MODEL_NAME": "org/tiny"})
    (job,) = load_converter_dir(converter)
    assert job.model_dir == (converter / "models" / "org" / "tiny").resolve()
    assert job.stem == "tiny"
    assert job.log_file.name == "Converter_CPU_LLM_LLAMA_tiny.log"


def test_run_refuses_model_name_dot(cli, tmp_path):
    converter = write_layout(tmp_path, {"MODEL_NAME": "."})
    write_model(converter / "models")  # MODELS_PATH itself is a model folder: `.` would convert it
    before = tree_digest(converter)
    result = cli("run", converter, "--no-fidelity")
    assert_refused(result, 2, "MODEL_NAME", "it names a folder, and the files would be hidden")
    assert tree_digest(converter) == before
    assert ggufs_under(tmp_path) == []


def test_batch_name_uses_the_shared_rule(tmp_path):
    batch = tmp_path / "conversions.yaml"
    batch.write_text("models: [{path: 'models/my model', precisions: Q8_0, pairs: cpu}]\n")
    with pytest.raises(ConfigError, match="cannot be a file name stem") as info:
        load_batch(batch)
    assert "give the model a `name:`" in (info.value.hint or "")


def test_action_model_name_input_is_checked(tmp_path):
    model = write_model(tmp_path / "model")
    (tmp_path / "summary.md").touch()
    env = {
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "INPUT_MODEL": str(model),
        "INPUT_PRECISIONS": "Q8_0",
        "INPUT_OUTDIR": str(tmp_path / "out"),
        "INPUT_MODEL_NAME": "../escape",
    }
    stdout = io.StringIO()
    assert gha.main(["convert"], env=env, stdout=stdout) == 2
    assert "the `model-name` input" in stdout.getvalue()
    assert not (tmp_path / "out").exists() and ggufs_under(tmp_path) == []


# ------------------------------------------------------------------------------- 2. publish trusts manifests


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][0].update(changes)
    for key, value in changes.items():
        if value is None:
            del manifest["files"][0][key]
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["absolute", "climbing", "no-sha256", "bad-sha256", "hidden", "symlink"])
def test_publish_refuses_a_manifest_entry_before_any_request(tmp_path, kind):
    secret = tmp_path / "host" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    folder = make_output(tmp_path / "out")
    gguf_name = json.loads((folder / "manifest.json").read_text())["files"][0]["name"]
    if kind == "absolute":
        _edit_manifest(folder, name=str(secret))
    elif kind == "climbing":
        _edit_manifest(folder, name="../host/id_rsa")
    elif kind == "no-sha256":
        _edit_manifest(folder, sha256=None)
    elif kind == "bad-sha256":
        _edit_manifest(folder, sha256="0" * 12)
    elif kind == "hidden":
        (folder / ".env").write_text("TOKEN=x")
        _edit_manifest(folder, name=".env")
    else:
        (folder / "link.gguf").symlink_to(secret)
        _edit_manifest(folder, name="link.gguf")
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(UsageError) as info:
            publish(server, [folder])
        assert server.requests == []  # refused before the first request
    message = info.value.message
    assert str(folder / "manifest.json") in message and "files[0]" in message
    assert "nothing was published" in message
    assert gguf_name  # the good file was not the problem


def test_publish_cli_refuses_an_absolute_manifest_name(cli, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    folder = make_output(tmp_path / "out")
    _edit_manifest(folder, name=str(secret))
    with FakeGitHubServer(REPO, TOKEN) as server:
        result = cli("publish", folder, "--tag", "v1", "--repo", REPO,
                     env={"GITHUB_TOKEN": TOKEN, "GITHUB_API_URL": server.api_url})  # fmt: skip
        assert server.requests == []
    assert_refused(result, 2, "files[0].name", "is a path, not a file name in the same folder")


@pytest.mark.parametrize("manifest", [[], {"files": {"name": "x"}}, {"files": ["x.gguf"]}, {"model_name": "../x"}])
def test_publish_refuses_a_malformed_manifest(tmp_path, manifest):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(UsageError, match=r"manifest\.json"):
            publish(server, [folder])
        assert server.requests == []


# ----------------------------------------------------------------------------- 3. weights outside the folder


def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    outside = write_model(tmp_path / "other")
    model = write_model(tmp_path / "model")
    index = {"weight_map": {"model.embed_tokens.weight": "../other/model.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert (model / "../other/model.safetensors").is_file() and outside
    with pytest.raises(UsageError, match=r"weight_map\[.*is a path, not a file name"):
        check_model_dir(model)


def test_a_shard_linked_like_a_hub_cache_snapshot_is_accepted_and_fingerprinted(tmp_path):
    from cecai_converter.source import fingerprint_files

    blobs = write_model(tmp_path / "blobs")  # a Hugging Face cache links snapshots/<sha>/x to ../../blobs/<hash>
    model = write_model(tmp_path / "snapshots" / "sha")
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(blobs / "model.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_model_dir(model).weights == ("model.safetensors",)
    before, _ = fingerprint_files(model)
    data = bytearray((blobs / "model.safetensors").read_bytes())
    data[-1] = 1  # the target changes: the folder's fingerprint changes with it
    (blobs / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint_files(model)[0] != before


@pytest.mark.parametrize(
    "index",
    [
        {"weight_map": ["model.safetensors"]},
        {"weight_map": {"w": ["model.safetensors"]}},
        {"weight_map": {"w": "notes.txt"}},
        ["weight_map"],
    ],
)
def test_index_of_the_wrong_shape_is_refused(tmp_path, index):
    model = write_model(tmp_path / "model")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"model\.safetensors\.index\.json"):
        check_model_dir(model)


@pytest.mark.parametrize(
    ("tensors", "data", "why"),
    [
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
          "b": {"dtype": "F32", "shape": [8], "data_offsets": [16, 48]}}, bytes(48), "overlap"),
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": ["0", 32]}}, bytes(32), "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0.0, 32.5]}}, bytes(32), "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32, 64]}}, bytes(32), "data_offsets"),
        ({"a": {"dtype": "F32", "shape": ["8"], "data_offsets": [0, 32]}}, bytes(32), "shape"),
        ({"a": {"dtype": "F32", "shape": [-8], "data_offsets": [0, 32]}}, bytes(32), "shape"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, bytes(32), "does not fill"),
        ({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 32]}}, bytes(32), "64-bit"),
        ({"a": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}}, b"", "64-bit"),
        ({"a": {"dtype": "Q4", "shape": [8], "data_offsets": [0, 32]}}, bytes(32), "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [32, 0]}}, bytes(32), "data_offsets"),
        ({"a": [1, 2]}, bytes(32), "expected an object"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, bytes(32), "belong to no tensor"),
    ],
    ids=["overlap", "string-offset", "float-offset", "three-offsets", "string-dim", "negative-dim", "short-shape",
         "huge-shape", "overflow-then-zero", "unknown-dtype", "reversed-offsets", "not-an-object", "gap"],
)  # fmt: skip
def test_safetensors_header_bounds(tmp_path, tensors, data, why):
    model = write_model(tmp_path / "model", tensors=tensors, data=data)
    with pytest.raises(UsageError, match="truncated or corrupt") as info:
        check_model_dir(model)
    assert why in info.value.message


@pytest.mark.parametrize("where", ["header", "config", "index"])
def test_deeply_nested_json_is_refused_without_a_traceback(tmp_path, where):
    deep = "[" * 200_000 + "]" * 200_000
    model = write_model(tmp_path / "model")
    if where == "header":
        (model / "model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep.encode())
    elif where == "config":
        (model / "config.json").write_text(deep)
    else:
        (model / "model.safetensors.index.json").write_text(deep)
    with pytest.raises(UsageError):
        check_model_dir(model)


@pytest.mark.parametrize(
    "config",
    [
        {"vocab_size": 2**62},
        {"vocab_size": 1_000_000},  # 1M tokens x 4 wide cannot live in 128 bytes of weights
        {"vocab_size": "8"},
        {"vocab_size": True},
        {"max_position_embeddings": 2**40},
        {"hidden_size": -4},
        {"text_config": {"vocab_size": 2**62}},
    ],
)
def test_config_sizes_the_weights_cannot_hold_are_refused(tmp_path, config):
    model = write_model(tmp_path / "model", config=config)
    with pytest.raises(UsageError, match=r"config\.json"):
        check_model_dir(model)


def test_a_consistent_hand_made_model_passes(tmp_path):
    source = check_model_dir(write_model(tmp_path / "model", config={"max_position_embeddings": 131072}))
    assert source.weights == ("model.safetensors",)


# -------------------------------------------------------------------------------- 4. outputs inside inputs


@pytest.mark.parametrize("key", ["OUTPUTS_PATH", "LOGS_PATH"])
def test_outputs_or_logs_inside_the_model_folder_are_refused(tmp_path, key):
    converter = write_layout(tmp_path, {"MODEL_NAME": "m", key: "../models/m/out"})
    write_model(converter / "models" / "m")
    with pytest.raises(ConfigError, match=f"{key} .* is inside the model folder"):
        load_converter_dir(converter)


def test_run_with_outputs_path_a_file_is_refused_before_converting(cli, tmp_path):
    converter = write_layout(tmp_path, {"MODEL_NAME": "m", "OUTPUTS_PATH": "../outputs"})
    model = write_model(converter / "models" / "m")
    (converter / "outputs").write_text("not a folder")
    before = tree_digest(model)
    result = cli("run", converter, "--no-fidelity")
    assert_refused(result, 2, "OUTPUTS_PATH", "is a file, not a folder")
    assert tree_digest(model) == before


def test_convert_outdir_inside_the_model_or_a_file_is_refused(cli, tmp_path):
    model = write_model(tmp_path / "model")
    before = tree_digest(model)
    result = cli("convert", model, "--precision", "Q8_0", "--outdir", model / "gguf")
    assert_refused(result, 2, "is inside the model folder")
    (tmp_path / "file").write_text("x")
    result = cli("convert", model, "--precision", "Q8_0", "--outdir", tmp_path / "file" / "out")
    assert_refused(result, 2, "--outdir", "is a file, not a folder")
    assert tree_digest(model) == before


def test_convert_outdir_on_a_read_only_mount_is_refused(cli, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a read-only tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr!r}")
    try:
        result = cli("convert", write_model(tmp_path / "model"), "--precision", "Q8_0", "--outdir", mount / "out")
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert_refused(result, 2, "--outdir", "cannot write in", "read-only")


# ---------------------------------------------------------------------------- 5. workflow commands via data


@pytest.mark.parametrize(
    "model",
    [
        '{path: "models/a\\n::warning::injected", precisions: Q8_0, pairs: cpu}',
        '{repo: o/m, revision: "main\\r\\n::add-mask::x", precisions: Q8_0, pairs: cpu}',
        '{repo: o/m, name: "m\\u2028x", precisions: Q8_0, pairs: cpu}',
    ],
)
def test_batch_values_with_control_characters_are_refused(tmp_path, model):
    batch = tmp_path / "conversions.yaml"
    batch.write_text(f"models: [{model}]\n")
    with pytest.raises(ConfigError, match="control character U\\+"):
        load_batch(batch)


def test_plan_never_echoes_a_workflow_command_from_the_batch(tmp_path):
    batch = tmp_path / "conversions.yaml"
    batch.write_text('models: [{path: "models/a\\n::warning::injected", precisions: Q8_0, pairs: cpu}]\n')
    (tmp_path / "summary.md").touch()
    env = {"GITHUB_OUTPUT": str(tmp_path / "o"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
           "INPUT_BATCH": str(batch)}  # fmt: skip
    stdout = io.StringIO()
    assert gha.main(["plan"], env=env, stdout=stdout) == 2
    assert not any(line.startswith("::warning::") for line in stdout.getvalue().splitlines())
    assert "U+000A" in stdout.getvalue()


def test_action_log_lines_cannot_start_a_workflow_command(tmp_path):
    model = tmp_path / "a\n::warning::injected" / "model"
    model.mkdir(parents=True)  # no config.json: refused right after the pipeline logged the model's path
    (tmp_path / "summary.md").touch()
    env = {
        **os.environ,
        "GITHUB_OUTPUT": str(tmp_path / "o"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "INPUT_MODEL": str(model),
        "INPUT_MODEL_NAME": "m",
        "INPUT_PRECISIONS": "Q8_0",
        "INPUT_OUTDIR": str(tmp_path / "out"),
    }
    proc = subprocess.run([sys.executable, "-m", "cecai_converter.gha", "convert"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "injected" in proc.stderr  # the path was logged ...
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in lines if line.lstrip().startswith("::warning::")]  # ... but never as a command


def test_runner_labels_may_not_end_in_a_newline(tmp_path):
    batch = tmp_path / "conversions.yaml"
    batch.write_text('runner-labels: {cpu: ["linux\\n"]}\nmodels: [{repo: o/m, precisions: Q8_0, pairs: cpu}]\n')
    with pytest.raises(ConfigError, match="runner labels"):
        load_batch(batch)


def test_summary_cells_stay_on_one_line():
    md = job_summary.conversion_summary(
        {"files": [{"name": "a\r\n::warning::x|y", "precision": "Q8_0"}]}, None, title="t"
    )
    row = next(line for line in md.splitlines() if line.startswith("| `a"))
    assert "\r" not in row and "::warning::x\\|y" in row


# ------------------------------------------------------------------------------------ 9. a bad manifest.json


GOOD_MANIFEST = {"schema": 1, "model_name": "m", "pair": None,
                 "files": [{"name": "m.q8_0.gguf", "precision": "Q8_0", "sha256": "ab" * 32, "bytes": 3}]}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"files": ["m.q8_0.gguf"]}, "files[0]: expected an object"),
        ({"files": {"name": "x"}}, "files: expected a list"),
        ({"files": [{**GOOD_MANIFEST["files"][0], "bytes": "3"}]}, "files[0].bytes"),
        ({"files": [{**GOOD_MANIFEST["files"][0], "name": "../../etc/passwd"}]}, "files[0].name"),
        ({"source": {"files": [{"path": "a"}]}}, "source.files[0]"),
        ({"runtime": [1]}, "runtime: expected an object"),
        ({"model_name": "../../elsewhere"}, "model_name: '../../elsewhere' cannot be a file name stem"),
    ],
)
def test_a_malformed_manifest_is_no_record_and_says_which_field(tmp_path, change, field):
    from cecai_converter.manifest import read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps(GOOD_MANIFEST))
    good = read_manifest(tmp_path)
    assert good is not None and good.to_dict() == GOOD_MANIFEST
    (tmp_path / "manifest.json").write_text(json.dumps({**GOOD_MANIFEST, **change}))
    with logged("cecai.manifest") as records:
        assert read_manifest(tmp_path) is None
    (message,) = [r.getMessage() for r in records]
    assert str(tmp_path / "manifest.json") in message and field in message


@pytest.mark.slow
def test_run_redoes_a_folder_whose_manifest_was_damaged(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    first = cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", out, "--no-fidelity")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "files": ["tiny.q8_0.gguf"]}))
    again = cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", out, "--no-fidelity")
    assert_refused(again, 0, "files[0]: expected an object")
    redone = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in redone["files"]] == [f["name"] for f in manifest["files"]]


# ------------------------------------------------------------------------------------------------ 7. YAML


def test_duplicate_yaml_keys_are_an_error_naming_the_line(tmp_path):
    path = tmp_path / "converter_args.yaml"
    path.write_text("MODEL_NAME: a\nOUTPUTS_PATH: ../out\nMODEL_NAME: b\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'MODEL_NAME' \(first at line 1\)"):
        load_yaml_mapping(path)


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert load_yaml_mapping(path)["other"] == {"x": 3, "y": 2}


BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
)


@pytest.mark.parametrize("tail", ["MODEL_NAME: *i", "THRESHOLDS: {Q8_0: *i}"])
def test_an_alias_bomb_is_refused_quickly_with_a_short_message(cli, tmp_path, tail):
    converter = write_layout(tmp_path, {})
    general = converter / "configurations" / "converter_args.yaml"
    general.write_text(f"{BOMB}\n{tail}\n")  # 9**9 values once expanded; a few small lists in memory
    started = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than") as info:
        load_yaml_mapping(general)
    assert time.monotonic() - started < 5
    assert len(info.value.message) < 500
    result = cli("run", converter)
    assert_refused(result, 2, "expands to more than")
    assert len(result.stderr) < 2000
