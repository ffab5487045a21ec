"""Publishing to a GitHub release, against FakeGitHubServer (a local stand-in for GitHub's REST API)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from github_stand_in import FakeGitHubServer

from cecai_converter import cli
from cecai_converter.errors import PublishFailed, UsageError
from cecai_converter.manifest import load_manifest
from cecai_converter.release.assets import CHECKSUMS_NAME, collect_assets, parse_checksums
from cecai_converter.release.hub_push import push_to_hub
from cecai_converter.release.manifests import release_manifest
from cecai_converter.release.publish import PARTIAL_SUFFIX, publish_release
from cecai_converter.release.split import split_gguf

TOKEN = "ghs_test_token"
REPO = "octo/models"


def make_gguf(path: Path, *, n_tensors: int = 6, floats: int = 1024, seed: int = 0) -> Path:
    """A small valid GGUF file: a few key/values of each kind and float32 tensors."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_block_count(n_tensors)
    writer.add_name("tiny")
    writer.add_file_type(0)
    writer.add_token_list(["<s>", "</s>", "hello"])
    writer.add_token_scores([0.0, -1.0, -2.5])
    for i in range(n_tensors):
        writer.add_tensor(f"blk.{i}.weight", rng.standard_normal(floats).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_output(folder: Path, *, name: str = "tiny", pair: str | None = "CPU_LLM_LLAMA", seed: int = 0, **kw) -> Path:
    """A conversion output folder: one GGUF file and its manifest.json, as `cecai-convert convert` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = make_gguf(folder / f"{name}.q8_0.gguf", seed=seed, **kw)
    manifest = {
        "schema": 1,
        "pair": pair,
        "model_name": name,
        "files": [
            {
                "name": path.name,
                "precision": "Q8_0",
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        ],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.fixture
def server():
    with FakeGitHubServer(REPO, TOKEN) as fake:
        yield fake


def publish(server: FakeGitHubServer, inputs: list[Path], tag: str = "v1.0", **kw):
    return publish_release(inputs, repo=REPO, tag=tag, token=TOKEN, api_url=server.api_url, retries=0, **kw)


# ------------------------------------------------------------------------------------------------ splitting


def test_split_gguf_writes_llama_cpp_split_parts(tmp_path):
    src = make_gguf(tmp_path / "m.gguf", n_tensors=6, floats=1024)  # 4 KiB per tensor
    limit = 10_000
    parts = split_gguf(src, tmp_path / "parts", size_limit=limit)
    assert [p.name for p in parts] == [f"m-{i:05d}-of-{len(parts):05d}.gguf" for i in range(1, len(parts) + 1)]
    assert len(parts) > 1
    original = gguf.GGUFReader(src)
    tensors = {}
    for i, part in enumerate(parts):
        assert part.stat().st_size < limit
        reader = gguf.GGUFReader(part)
        assert reader.get_field("split.no").contents() == i
        assert reader.get_field("split.count").contents() == len(parts)
        assert reader.get_field("split.tensors.count").contents() == len(original.tensors)
        if i == 0:  # the first part carries every key/value of the original
            assert reader.get_field("tokenizer.ggml.tokens").contents() == ["<s>", "</s>", "hello"]
            assert reader.get_field("general.name").contents() == "tiny"
        else:
            assert reader.get_field("general.name") is None
        tensors.update({t.name: np.array(t.data) for t in reader.tensors})
    assert list(tensors) == [t.name for t in original.tensors]
    for t in original.tensors:
        np.testing.assert_array_equal(tensors[t.name], np.array(t.data))


def test_split_refuses_a_tensor_larger_than_the_limit(tmp_path):
    src = make_gguf(tmp_path / "m.gguf", n_tensors=2, floats=4096)  # 16 KiB tensors
    with pytest.raises(UsageError, match="cannot fit"):
        split_gguf(src, tmp_path / "parts", size_limit=8_000)


def test_collect_refuses_a_file_that_does_not_match_its_manifest(tmp_path):
    out = make_output(tmp_path / "a")
    (out / "tiny.q8_0.gguf").write_bytes(b"GGUF damaged")
    with pytest.raises(UsageError, match="does not match its manifest"):
        collect_assets([out])


def test_collect_keeps_identical_files_once_and_names_manifests_per_pair(tmp_path):
    cpu = make_output(tmp_path / "cpu", pair="CPU_LLM_LLAMA")
    gpu = make_output(tmp_path / "gpu", pair="GPU_LLM_LLAMA")
    names = [a.name for a in collect_assets([cpu, gpu])]
    assert names == ["tiny.q8_0.gguf", "tiny.cpu.manifest.json", "tiny.gpu.manifest.json"]


def test_collect_refuses_two_different_files_with_one_name(tmp_path):
    a = make_output(tmp_path / "a", seed=1)
    b = make_output(tmp_path / "b", seed=2, pair="GPU_LLM_LLAMA")
    with pytest.raises(UsageError, match="two different files"):
        collect_assets([a, b])


# ------------------------------------------------------------------------------------------------ publishing


def test_first_publish_makes_a_draft_uploads_then_publishes(server, tmp_path):
    out = make_output(tmp_path / "cpu")
    result = publish(server, [out])
    release = server.release_by_tag("v1.0")
    assert result.created and not result.draft and not release["draft"]
    assert server.asset_names(release["id"]) == sorted([CHECKSUMS_NAME, "tiny.cpu.manifest.json", "tiny.q8_0.gguf"])
    sums = parse_checksums(server.asset_data(release["id"], CHECKSUMS_NAME).decode())
    gguf_bytes = (out / "tiny.q8_0.gguf").read_bytes()
    assert sums["tiny.q8_0.gguf"] == hashlib.sha256(gguf_bytes).hexdigest()
    assert set(sums) == {"tiny.q8_0.gguf", "tiny.cpu.manifest.json"}
    published = json.loads(server.asset_data(release["id"], "tiny.cpu.manifest.json"))
    assert published == release_manifest(load_manifest(out / "manifest.json"), []).to_dict()
    # every upload happened while the release was a draft; publishing was the last write
    writes = [(m, p) for m, p, _ in server.requests if m != "GET"]
    assert writes[0][0] == "POST" and writes[0][1].endswith("/releases")
    assert writes[-1][0] == "PATCH" and "/releases/" in writes[-1][1]
    assert "tiny.q8_0.gguf" in release["body"] and "sha256sum -c SHA256SUMS" in release["body"]
    # the token travels only in the Authorization header
    assert all(TOKEN not in path for _, path, _ in server.requests)


def test_large_files_are_split_below_the_limit_and_the_notes_say_so(server, tmp_path):
    out = make_output(tmp_path / "cpu", n_tensors=6, floats=1024)
    result = publish(server, [out], size_limit=10_000)
    release = server.release_by_tag("v1.0")
    names = server.asset_names(release["id"])
    parts = result.split["tiny.q8_0.gguf"]
    assert len(parts) > 1 and "tiny.q8_0.gguf" not in names
    assert set(parts) <= set(names)
    assert all(a["size"] < 10_000 for a in server.assets.values())
    assert "gguf-split" in release["body"] and parts[0] in release["body"]
    sums = parse_checksums(server.asset_data(release["id"], CHECKSUMS_NAME).decode())
    assert set(parts) <= set(sums)


def test_rerun_skips_identical_files_and_leaves_other_assets_alone(tmp_path):
    with FakeGitHubServer(REPO, TOKEN, immutable_releases=False) as server:
        out = make_output(tmp_path / "cpu")
        publish(server, [out])
        release = server.release_by_tag("v1.0")
        server.add_asset(release["id"], "notes.txt", b"user's own file")
        before = {a["id"]: a["name"] for a in server.assets.values()}
        uploads = sum(1 for m, p, _ in server.requests if m == "POST" and "/uploads/" in p)
        result = publish(server, [out])
        assert result.uploaded == []
        assert set(result.unchanged) == {"tiny.q8_0.gguf", "tiny.cpu.manifest.json", CHECKSUMS_NAME}
        assert {a["id"]: a["name"] for a in server.assets.values()} == before
        assert sum(1 for m, p, _ in server.requests if m == "POST" and "/uploads/" in p) == uploads


def test_adding_files_to_a_published_mutable_release_uses_temporary_names(tmp_path):
    with FakeGitHubServer(REPO, TOKEN, immutable_releases=False) as server:
        publish(server, [make_output(tmp_path / "a", name="alpha")])
        server.requests.clear()
        publish(server, [make_output(tmp_path / "b", name="beta")])
        release = server.release_by_tag("v1.0")
        uploaded = [p for m, p, _ in server.requests if m == "POST" and "/uploads/" in p]
        assert uploaded and all(PARTIAL_SUFFIX.replace(".", "") in p for p in uploaded)
        names = server.asset_names(release["id"])
        assert not any(n.endswith(PARTIAL_SUFFIX) for n in names)
        assert {"alpha.q8_0.gguf", "beta.q8_0.gguf", CHECKSUMS_NAME} <= set(names)
        sums = parse_checksums(server.asset_data(release["id"], CHECKSUMS_NAME).decode())
        assert {"alpha.q8_0.gguf", "beta.q8_0.gguf", "alpha.cpu.manifest.json", "beta.cpu.manifest.json"} == set(sums)
        assert "alpha.q8_0.gguf" in release["body"] and "beta.q8_0.gguf" in release["body"]


def test_rerun_on_a_published_immutable_release_is_a_no_op(server, tmp_path):
    out = make_output(tmp_path / "cpu")
    publish(server, [out])
    assert server.release_by_tag("v1.0")["immutable"]
    result = publish(server, [out])
    assert result.uploaded == [] and not result.draft


def test_new_files_for_a_published_immutable_release_are_refused_before_uploading(server, tmp_path):
    publish(server, [make_output(tmp_path / "a", name="alpha")])
    server.requests.clear()
    with pytest.raises(PublishFailed, match="immutable") as info:
        publish(server, [make_output(tmp_path / "b", name="beta")])
    assert "new tag" in (info.value.hint or "")
    assert not [m for m, _, _ in server.requests if m != "GET"]


def test_a_different_file_under_a_taken_name_is_refused_and_nothing_is_uploaded(server, tmp_path):
    release = server.add_release("v1.0", draft=True)
    server.add_asset(release["id"], "tiny.q8_0.gguf", b"someone else's file")
    with pytest.raises(PublishFailed, match=r"different files named tiny\.q8_0\.gguf"):
        publish(server, [make_output(tmp_path / "cpu")])
    assert server.asset_names(release["id"]) == ["tiny.q8_0.gguf"]
    assert server.releases[release["id"]]["draft"]


def test_failure_mid_upload_leaves_nothing_half_published_and_a_rerun_finishes(server, tmp_path):
    out = make_output(tmp_path / "cpu", n_tensors=6, floats=1024)
    server.fail_uploads = {"tiny.q8_0-00002-of-00003.gguf"}
    with pytest.raises(PublishFailed, match="HTTP 502") as info:
        publish(server, [out], size_limit=10_000)
    assert "draft" in info.value.message
    release = server.release_by_tag("v1.0")
    assert release["draft"], "a failed run must not publish"
    assert server.asset_names(release["id"]) == [], "the first part and the failed upload's leftover are removed"

    server.fail_uploads = set()
    result = publish(server, [out], size_limit=10_000)
    assert not result.created and not result.draft
    names = server.asset_names(release["id"])
    assert {"tiny.q8_0-00001-of-00003.gguf", "tiny.q8_0-00002-of-00003.gguf", "tiny.q8_0-00003-of-00003.gguf"} <= set(
        names
    )
    assert all(a["state"] == "uploaded" for a in server.assets.values())


def test_leftover_of_an_interrupted_upload_is_replaced(server, tmp_path):
    out = make_output(tmp_path / "cpu")
    release = server.add_release("v1.0", draft=True)
    server.add_asset(release["id"], "tiny.q8_0.gguf", b"half", state="starter")
    publish(server, [out])
    assert server.asset_data(release["id"], "tiny.q8_0.gguf") == (out / "tiny.q8_0.gguf").read_bytes()


def test_a_draft_is_left_a_draft_on_request(server, tmp_path):
    result = publish(server, [make_output(tmp_path / "cpu")], publish=False)
    assert result.draft and server.release_by_tag("v1.0")["draft"]


def test_a_refused_token_says_which_permission_is_needed(server, tmp_path):
    with pytest.raises(PublishFailed, match="HTTP 401") as info:
        publish_release(
            [make_output(tmp_path / "cpu")], repo=REPO, tag="v1", token="wrong", api_url=server.api_url, retries=0
        )
    assert "token" in (info.value.hint or "")
    assert "wrong" not in info.value.message


def test_cli_publish_takes_the_token_from_the_environment_only(server, tmp_path, monkeypatch, capsys):
    out = make_output(tmp_path / "cpu")
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("GITHUB_API_URL", server.api_url)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO)
    assert cli.main(["--format", "json", "publish", str(out), "--tag", "v2.0"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["tag"] == "v2.0" and "tiny.q8_0.gguf" in result["uploaded"]
    assert TOKEN not in captured.out + captured.err
    with pytest.raises(SystemExit):
        cli.main(["publish", str(out), "--tag", "v2.0", "--token", TOKEN])


def test_cli_publish_without_a_token_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    code = cli.main(["publish", str(make_output(tmp_path / "cpu")), "--tag", "v1", "--repo", REPO])
    assert code == 2
    assert "GITHUB_TOKEN is not set" in capsys.readouterr().err


def test_push_to_hub_commits_files_manifests_and_checksums(tmp_path):
    calls = {}

    class FakeHfApi:  # a stand-in for huggingface_hub.HfApi: the Hub is not reachable here
        def create_repo(self, repo_id, **kw):
            calls["repo"] = (repo_id, kw)

        def create_commit(self, repo_id, operations, commit_message, revision=None):
            calls["ops"] = sorted(op.path_in_repo for op in operations)
            return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/abc"})()

    url = push_to_hub([make_output(tmp_path / "cpu")], "octo/tiny-gguf", token="hf_x", api=FakeHfApi())
    assert url.endswith("/commit/abc")
    assert calls["ops"] == [CHECKSUMS_NAME, "tiny.cpu.manifest.json", "tiny.q8_0.gguf"]
    assert calls["repo"] == ("octo/tiny-gguf", {"repo_type": "model", "exist_ok": True})
