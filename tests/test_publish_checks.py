"""Publishing files made once with the check records of every pair, against FakeGitHubServer (GitHub stand-in).

The check records here are written the way `cecai-convert check` writes them (test_check.py runs the real command);
what is tested is what the publisher does with them: one manifest per model holding a record per pair, the notes'
pairs × files table, a draft when a check failed or is missing, and re-runs that upload nothing new.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from github_stand_in import FakeGitHubServer
from test_publish import REPO, TOKEN, make_output

from cecai_converter import cli
from cecai_converter.errors import ChecksFailed, UsageError
from cecai_converter.pairs import PAIRS
from cecai_converter.records import CHECK_SCHEMA, record_name
from cecai_converter.release.assets import CHECKSUMS_NAME, parse_checksums
from cecai_converter.release.hub_push import push_to_hub
from cecai_converter.release.publish import publish_release


def made(folder: Path) -> Path:
    """A make job's outputs folder: no pair, the source recorded with a host path and mtimes, as the builder does."""
    out = make_output(folder, pair=None)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"] = {
        "kind": "local",
        "path": "/home/runner/work/models/tiny",
        "fingerprint": "f" * 64,
        "files": [{"path": "config.json", "bytes": 10, "mtime_ns": 123, "sha256": "a" * 64}],
    }
    manifest["files"][0]["mtime_ns"] = 456
    manifest["timings"] = {"total_s": 1.5}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def write_record(folder: Path, files_dir: Path, pair: str, *, passed: bool = True, tps: float = 100.0) -> Path:
    manifest = json.loads((files_dir / "manifest.json").read_text())
    rows = [
        {
            "name": f["name"],
            "precision": f["precision"],
            "sha256": f["sha256"],
            "sha256_match": True,
            "generated_tokens": 8,
            "agreement": {
                "kld_mean": 1e-6,
                "kld_max": 2e-6,
                "top1_agreement": 1.0 if passed else 0.2,
                "n_positions": 64,
                "prompt_tps": tps * 10,
                "gen_tps": tps,
                "peak_rss_mib": 300.0,
                "offloaded_layers": 0,
                "total_layers": 7,
            },
            "passed": passed,
            "problems": [] if passed else ["top-1 agreement with the builder's runtime 0.200 is below min_top1 0.9"],
        }
        for f in manifest["files"]
    ]
    record = {
        "schema": CHECK_SCHEMA,
        "pair": pair,
        "model_name": manifest["model_name"],
        "passed": passed,
        "runtime": {"device": "cpu", "machine": "x86_64", "llama_cpp_python": "0.3.36", "backend": "local"},
        "limits": {"max_kld": 0.01, "min_top1": 0.9},
        "problems": [],
        "files": rows,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / record_name(manifest["model_name"], PAIRS[pair])
    path.write_text(json.dumps(record))
    return path


def publish(server: FakeGitHubServer, inputs: list[Path], **kw):
    return publish_release(inputs, repo=REPO, tag="v1.0", token=TOKEN, api_url=server.api_url, retries=0, **kw)


def uploads(server: FakeGitHubServer) -> int:
    return sum(1 for m, p, _ in server.requests if m == "POST" and "/uploads/" in p)


def test_each_file_once_one_manifest_with_a_record_per_pair_and_a_notes_table(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    checks = tmp_path / "checks"
    for pair in ("CPU_LLM_LLAMA", "ARM_LLM_LLAMA"):
        write_record(checks, files, pair)
    with FakeGitHubServer(REPO, TOKEN) as server:
        result = publish(server, [files], checks=[checks], expected_checks=[("tiny", "CPU_LLM_LLAMA")])
        release = server.release_by_tag("v1.0")
        assert not result.draft and not release["draft"]
        assert server.asset_names(release["id"]) == sorted([CHECKSUMS_NAME, "tiny.manifest.json", "tiny.q8_0.gguf"])
        manifest = json.loads(server.asset_data(release["id"], "tiny.manifest.json"))
        assert sorted(manifest["checks"]) == ["ARM_LLM_LLAMA", "CPU_LLM_LLAMA"]
        assert manifest["checks"]["ARM_LLM_LLAMA"]["runtime"]["device"] == "cpu"
        # no host paths, no mtimes in what is published
        assert "path" not in manifest["source"] and "/home/runner" not in json.dumps(manifest)
        assert "mtime_ns" not in json.dumps(manifest)
        sums = parse_checksums(server.asset_data(release["id"], CHECKSUMS_NAME).decode())
        published = server.asset_data(release["id"], "tiny.manifest.json")
        assert sums["tiny.manifest.json"] == hashlib.sha256(published).hexdigest()
        body = release["body"]
        assert "| File | CPU_LLM_LLAMA | ARM_LLM_LLAMA |" in body
        assert "| `tiny.q8_0.gguf` | ✅ 100 tok/s · KLD 1.0e-06 · top-1 100% | ✅ 100 tok/s" in body


def test_a_failed_check_leaves_the_release_a_draft_with_every_file_uploaded(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    checks = tmp_path / "checks"
    write_record(checks, files, "CPU_LLM_LLAMA")
    write_record(checks, files, "ARM_LLM_LLAMA", passed=False)
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(ChecksFailed, match="left a draft") as info:
            publish(server, [files], checks=[checks])
        assert "ARM_LLM_LLAMA: tiny.q8_0.gguf: top-1 agreement" in info.value.message
        release = server.release_by_tag("v1.0")
        assert release["draft"]
        assert set(server.asset_names(release["id"])) == {CHECKSUMS_NAME, "tiny.manifest.json", "tiny.q8_0.gguf"}
        assert "❌ top-1 agreement" in release["body"]
        # The pair is fixed and its check re-run: the same workflow run again replaces the manifest and publishes.
        write_record(checks, files, "ARM_LLM_LLAMA")
        gguf_uploads = [p for m, p, _ in server.requests if m == "POST" and "tiny.q8_0.gguf" in p]
        result = publish(server, [files], checks=[checks])
        assert result.replaced == ["tiny.manifest.json"] and "tiny.q8_0.gguf" in result.unchanged
        assert [p for m, p, _ in server.requests if m == "POST" and "tiny.q8_0.gguf" in p] == gguf_uploads
        release = server.release_by_tag("v1.0")
        assert not release["draft"]
        manifest = json.loads(server.asset_data(release["id"], "tiny.manifest.json"))
        assert manifest["checks"]["ARM_LLM_LLAMA"]["passed"] is True


def test_a_missing_expected_check_leaves_the_release_a_draft(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    checks = tmp_path / "checks"
    write_record(checks, files, "CPU_LLM_LLAMA")
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(ChecksFailed, match="no check record from GPU_LLM_LLAMA"):
            publish(
                server, [files], checks=[checks], expected_checks=[("tiny", "CPU_LLM_LLAMA"), ("tiny", "GPU_LLM_LLAMA")]
            )
        assert server.release_by_tag("v1.0")["draft"]


def test_a_rerun_whose_manifest_differs_only_in_speeds_uploads_nothing(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    checks = tmp_path / "checks"
    write_record(checks, files, "CPU_LLM_LLAMA", tps=100.0)
    with FakeGitHubServer(REPO, TOKEN) as server:
        publish(server, [files], checks=[checks])
        before = uploads(server)
        # A second run of the workflow: the same bytes, other timings and speeds, the source elsewhere.
        manifest = json.loads((files / "manifest.json").read_text())
        manifest["timings"] = {"total_s": 9.9}
        manifest["source"]["path"] = "/other/runner/path"
        manifest["files"][0]["mtime_ns"] = 789
        (files / "manifest.json").write_text(json.dumps(manifest))
        write_record(checks, files, "CPU_LLM_LLAMA", tps=87.5)
        result = publish(server, [files], checks=[checks])
        assert result.uploaded == [] and result.replaced == []
        assert "tiny.manifest.json" in result.unchanged and CHECKSUMS_NAME in result.unchanged
        assert uploads(server) == before


def test_a_check_record_of_a_model_not_being_published_is_refused(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    other = made(tmp_path / "make-other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model_name"] = "other"
    (other / "manifest.json").write_text(json.dumps(manifest))
    checks = tmp_path / "checks"
    write_record(checks, other, "CPU_LLM_LLAMA")
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(UsageError, match="check records for other, whose files are not being published"):
            publish(server, [files], checks=[checks])
        assert not [m for m, _, _ in server.requests if m != "GET"]


def cli_publish(server: FakeGitHubServer, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``cecai-convert publish … --tag v1.0`` against the stand-in; returns the exit code."""
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("GITHUB_API_URL", server.api_url)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO)
    return cli.main(["publish", *args, "--tag", "v1.0"])


def test_every_per_pair_manifest_of_a_model_gets_its_records_and_a_failed_one_keeps_the_draft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each pair converted on its own: two manifests of one model, one GGUF file (the same bytes).
    cpu = make_output(tmp_path / "cpu", pair="CPU_LLM_LLAMA")
    gpu = make_output(tmp_path / "gpu", pair="GPU_LLM_LLAMA")
    checks = tmp_path / "checks"
    write_record(checks, cpu, "CPU_LLM_LLAMA")
    write_record(checks, gpu, "GPU_LLM_LLAMA", passed=False)
    with FakeGitHubServer(REPO, TOKEN) as server:
        assert cli_publish(server, monkeypatch, str(cpu), str(gpu), "--checks", str(checks)) == 1
        release = server.release_by_tag("v1.0")
        assert release["draft"]
        for name in ("tiny.cpu.manifest.json", "tiny.gpu.manifest.json"):
            manifest = json.loads(server.asset_data(release["id"], name))
            assert sorted(manifest["checks"]) == ["CPU_LLM_LLAMA", "GPU_LLM_LLAMA"]
            assert manifest["checks"]["GPU_LLM_LLAMA"]["passed"] is False
        err = capsys.readouterr().err
        assert err.count("GPU_LLM_LLAMA: tiny.q8_0.gguf: top-1 agreement") == 1
        assert "❌ top-1 agreement" in release["body"]


def test_checks_already_in_an_input_manifest_are_no_evidence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = made(tmp_path / "make-tiny")
    manifest = json.loads((files / "manifest.json").read_text())
    manifest["checks"] = {"CPU_LLM_LLAMA": {"pair": "CPU_LLM_LLAMA", "passed": True, "files": []}}  # forged
    (files / "manifest.json").write_text(json.dumps(manifest))
    with FakeGitHubServer(REPO, TOKEN) as server:
        assert cli_publish(server, monkeypatch, str(files), "--expect-check", "tiny:CPU_LLM_LLAMA") == 1
        release = server.release_by_tag("v1.0")
        assert release["draft"]
        assert "checks" not in json.loads(server.asset_data(release["id"], "tiny.manifest.json"))
        assert "tiny: no check record from CPU_LLM_LLAMA" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"runtime": "cpu"}, "runtime: expected an object, found str"),
        ({"files": ["tiny.q8_0.gguf"]}, "files[0]: expected an object"),
        ({"files": [{"name": ["tiny.q8_0.gguf"]}]}, "files[0].name: expected a string"),
        ({"pair": 1}, "pair: expected a string"),
        ({"passed": "yes"}, "passed: expected true or false"),
        ({"runtime": None}, "runtime: expected an object, found NoneType"),
    ],
)
def test_a_malformed_check_record_is_refused_before_any_upload(
    tmp_path: Path, change: dict[str, object], field: str
) -> None:
    files = made(tmp_path / "make-tiny")
    path = write_record(tmp_path / "checks", files, "CPU_LLM_LLAMA")
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with FakeGitHubServer(REPO, TOKEN) as server:
        with pytest.raises(UsageError) as info:
            publish(server, [files], checks=[path])
        assert f"{path}: {field}" in info.value.message
        assert not [m for m, _, _ in server.requests if m != "GET"]


def test_push_to_hub_uploads_release_manifests_without_host_paths(tmp_path: Path) -> None:
    files = made(tmp_path / "make-tiny")
    manifest = json.loads((files / "manifest.json").read_text())
    manifest["request"] = {
        "values": {"calibration_text": str(tmp_path / "calib.txt")},
        "sources": {"calibration_text": "cli"},
    }
    (files / "manifest.json").write_text(json.dumps(manifest))
    checks = tmp_path / "checks"
    write_record(checks, files, "CPU_LLM_LLAMA")
    uploaded: dict[str, bytes] = {}

    class FakeHfApi:  # a stand-in for huggingface_hub.HfApi: the Hub is not reachable here
        def create_repo(self, repo_id: str, **kw: object) -> None:
            pass

        def create_commit(self, repo_id: str, operations: list, commit_message: str, revision: object = None) -> str:
            for op in operations:
                data = op.path_or_fileobj
                uploaded[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
            return f"https://hub.invalid/{repo_id}/commit/abc"

    push_to_hub([files], "octo/tiny-gguf", token="hf_x", api=FakeHfApi(), checks=[checks])
    published = uploaded["tiny.manifest.json"].decode()
    assert "/home/runner" not in published and str(tmp_path) not in published and "mtime_ns" not in published
    data = json.loads(published)
    assert data["request"]["values"]["calibration_text"] == "calib.txt"
    assert sorted(data["checks"]) == ["CPU_LLM_LLAMA"]
    sums = parse_checksums(uploaded[CHECKSUMS_NAME].decode())
    assert sums["tiny.manifest.json"] == hashlib.sha256(uploaded["tiny.manifest.json"]).hexdigest()
