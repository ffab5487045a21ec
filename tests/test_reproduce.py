"""`cecai-convert reproduce`: a rebuild from the manifest's records into a fresh folder, compared by SHA-256."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import tree_digest

from cecai_converter.manifest_fields import SourceFile
from cecai_converter.reproduce import source_differences


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_llama, cli) -> tuple[Path, Path]:
    """A real conversion: one quantized type, fidelity on (so it was quantized from an F32 base, which the
    converter alone would not have made: reproduce must make that base again to get the same bytes)."""
    root = tmp_path_factory.mktemp("reproduce")
    model = root / "tiny-src"
    shutil.copytree(tiny_llama, model)
    out = root / "out"
    result = cli("convert", model, "--precision", "Q4_K_M", "--outdir", out, "--model-name", "tiny")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["precision"] == "F32"
    return model, out


def _published(out: Path, dest: Path) -> Path:
    """The manifest as `publish` writes it: no host paths."""
    from cecai_converter.manifest import load_manifest
    from cecai_converter.release.manifests import release_manifest

    data = release_manifest(load_manifest(out / "manifest.json"), [])
    as_dict: dict[str, Any] = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    assert "path" not in as_dict["source"]
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "tiny.manifest.json"
    path.write_text(json.dumps(as_dict))
    return path


def _edited(out: Path, dest: Path, **changes: Any) -> Path:
    data = json.loads((out / "manifest.json").read_text())
    data.update(changes)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "manifest.json").write_text(json.dumps(data))
    return dest / "manifest.json"


@pytest.mark.slow
def test_an_unchanged_source_rebuilds_every_file_to_the_recorded_bytes(made, cli, tmp_path):
    model, out = made
    outputs_before, source_before = tree_digest(out), tree_digest(model)
    work = tmp_path / "work"
    result = cli("reproduce", out / "manifest.json", "--workdir", work)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((out / "manifest.json").read_text())["files"][0]
    assert f"tiny.q4_k_m.gguf  {recorded['sha256'][:16]}  {recorded['sha256'][:16]}  same" in result.stdout
    assert "all 1 file(s) rebuilt to the recorded bytes" in result.stdout
    rebuilt = work / "outputs" / "tiny.q4_k_m.gguf"
    assert rebuilt.read_bytes() == (out / "tiny.q4_k_m.gguf").read_bytes()
    assert tree_digest(out) == outputs_before  # the original outputs are never touched
    assert tree_digest(model) == source_before


@pytest.mark.slow
def test_a_published_manifest_needs_the_source_folder_and_then_reproduces(made, cli, tmp_path):
    model, out = made
    published = _published(out, tmp_path / "release")
    result = cli("reproduce", published)
    assert result.returncode == 2
    assert "drops host paths" in result.stderr and "--source PATH" in result.stderr
    result = cli("reproduce", published, "--source", model, "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["changed_inputs"] == []
    assert [f["match"] for f in data["files"]] == [True]
    assert data["workdir"] is None  # a temporary folder, removed


@pytest.mark.slow
def test_a_changed_source_names_the_file_and_the_input(made, cli, tmp_path):
    from cecai_converter.modelgen import build_model

    _, out = made
    other = build_model(tmp_path / "tiny-src", "llama", seed=1)  # same layout, other weights: still valid
    result = cli("reproduce", out / "manifest.json", "--source", other)
    assert result.returncode == 1, result.stderr
    assert "differs: tiny.q4_k_m.gguf" in result.stdout
    assert "changed input: source fingerprint" in result.stdout
    assert "model.safetensors changed" in result.stdout
    assert "config.json changed" not in result.stdout  # only the files that differ are named


@pytest.mark.slow
def test_another_toolchain_pin_is_refused_before_any_work(made, cli, tmp_path):
    _, out = made
    manifest = _edited(out, tmp_path / "old", toolchain={"llama_cpp_python": "0.2.90", "sdist_sha256": "0" * 64})
    result = cli("reproduce", manifest)
    assert result.returncode == 1
    assert "made with llama-cpp-python 0.2.90" in result.stderr
    assert "install the cecai-converter release that pins llama-cpp-python 0.2.90" in result.stderr


@pytest.mark.slow
def test_a_recorded_imatrix_must_be_found_and_match(made, cli, tmp_path):
    _, out = made
    record = {"file": "tiny.imatrix.gguf", "sha256": "0" * 64, "source": "given", "entries": 1}
    manifest = _edited(out, tmp_path / "imx", imatrix=record)
    result = cli("reproduce", manifest)
    assert result.returncode == 2
    assert "tiny.imatrix.gguf" in result.stderr and "--imatrix FILE" in result.stderr
    wrong = tmp_path / "other.imatrix.gguf"
    wrong.write_bytes(b"not the recorded matrix")
    result = cli("reproduce", manifest, "--imatrix", wrong)
    assert result.returncode == 2
    assert "the manifest records 0000000000000000" in result.stderr


@pytest.mark.slow
def test_the_workdir_must_be_fresh(made, cli, tmp_path):
    _, out = made
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine\n")
    result = cli("reproduce", out / "manifest.json", "--workdir", tmp_path / "busy")
    assert result.returncode == 2
    assert "not an empty folder" in result.stderr
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine\n"


@pytest.mark.slow
def test_the_workdir_is_never_in_the_outputs_or_the_source(made, cli, tmp_path):
    model, out = made
    outputs_before, source_before = tree_digest(out), tree_digest(model)
    for workdir, what in (
        (out, "folder of the original outputs"),
        (out / "rebuild", "folder of the original outputs"),
        (model / "sub" / "rebuild", "model source folder"),
        (out.parent, "folder of the original outputs"),  # holds both
    ):
        result = cli("reproduce", out / "manifest.json", "--workdir", workdir)
        assert result.returncode == 2, (workdir, result.stdout)
        assert f"is, is inside or holds the {what}" in result.stderr, result.stderr
    assert tree_digest(out) == outputs_before and tree_digest(model) == source_before
    # the local source given on the command line is protected as well
    published = _published(out, tmp_path / "release")
    result = cli("reproduce", published, "--source", model, "--workdir", model / "rebuild")
    assert result.returncode == 2 and "model source folder" in result.stderr
    assert tree_digest(model) == source_before


@pytest.mark.slow
def test_an_imatrix_name_that_is_a_path_is_refused_and_nothing_is_written(made, cli, tmp_path):
    _, out = made
    (tmp_path / "pwned.dat").write_bytes(b"matrix")
    record = {"file": "../../../pwned.dat", "sha256": hashlib.sha256(b"matrix").hexdigest(), "source": "given"}
    manifest = _edited(out, tmp_path / "a" / "b" / "c", imatrix=record)  # that name resolves to the bait above
    work = tmp_path / "w1" / "w2" / "work"
    result = cli("reproduce", manifest, "--workdir", work)
    assert result.returncode == 2
    assert "imatrix.file" in result.stderr and "is a path" in result.stderr
    assert not (tmp_path / "w1").exists()


@pytest.mark.slow
def test_a_wrong_imatrix_next_to_the_manifest_is_named_with_both_hashes(made, cli, tmp_path):
    _, out = made
    record = {"file": "tiny.imatrix.gguf", "sha256": "0" * 64, "source": "given", "entries": 1}
    manifest = _edited(out, tmp_path / "imx", imatrix=record)
    (tmp_path / "imx" / "tiny.imatrix.gguf").write_bytes(b"another matrix")
    result = cli("reproduce", manifest)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "not next to the manifest" not in message
    assert str(tmp_path / "imx" / "tiny.imatrix.gguf") in message
    assert hashlib.sha256(b"another matrix").hexdigest() in message and "0" * 64 in message


def test_a_missing_manifest_is_a_usage_error(cli, tmp_path):
    result = cli("reproduce", tmp_path / "nope.manifest.json")
    assert result.returncode == 2
    assert "no manifest at" in result.stderr


def test_source_differences_by_path():
    old = [SourceFile(path="a", sha256="1"), SourceFile(path="b", sha256="2"), SourceFile(path="c", sha256="3")]
    new = [SourceFile(path="a", sha256="1"), SourceFile(path="b", sha256="9"), SourceFile(path="d", sha256="4")]
    assert source_differences(old, new) == ["b changed", "c is missing", "d was added"]


@pytest.mark.slow
def test_hub_stand_in_source_reproduces_at_the_recorded_commit(tiny_llama, cli, tmp_path, monkeypatch):
    """A Hub source: the recorded repo id at the recorded commit, from a local stand-in for the Hub (the Hub is not
    reachable here; see tests/hub_stand_in.py)."""
    from hub_stand_in import HubStandIn

    from cecai_converter.toolchain import cache_root

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with HubStandIn() as hub:
        repo = hub.add_repo("octo/tiny-llama", tiny_llama)
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "hf-home"),
            "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
            "CECAI_TOOLCHAIN_DIR": str(cache_root()),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        out = tmp_path / "out"
        made = cli("convert", "octo/tiny-llama", "--precision", "Q8_0", "--outdir", out, "--no-fidelity", env=env)
        assert made.returncode == 0, made.stderr
        result = cli("reproduce", out / "manifest.json", env=env)
        assert result.returncode == 0, result.stderr
        assert "all 1 file(s) rebuilt to the recorded bytes" in result.stdout
        assert any(f"/resolve/{repo.sha}/" in r.path for r in hub.requests)
    card = cli("card", out)
    assert card.returncode == 0, card.stderr
    text = (out / "README.md").read_text()
    assert "base_model: octo/tiny-llama\n" in text
    assert f"--revision {repo.sha}" in text
