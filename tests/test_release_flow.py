"""The release flow's jobs, step by step, the way a runner runs the composite actions (test_gha.run_composite):
plan → one make job → check jobs (CPU local; CPU in the CPU image through the docker backend) → publish, against
FakeGitHubServer (GitHub's API cannot be reached from here). test_release_workflow.py runs the same flow through a
real Actions runner (nektos/act).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import engine
from github_stand_in import FakeGitHubServer
from test_gha import ROOT, run_composite

from cecai_converter.agreement import REFERENCE_NAME
from cecai_converter.release.assets import CHECKSUMS_NAME, parse_checksums

pytestmark = pytest.mark.slow
TOKEN = "ghs_test_token"
REPO = "octo/models"


def action(name: str) -> Path:
    return ROOT / "actions" / name / "action.yml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository checkout: a batch file and one local model."""
    from cecai_converter.modelgen import build_model

    root = tmp_path_factory.mktemp("workspace")
    build_model(root / "models" / "tiny", "llama", seed=0, size="tiny")
    (root / "conversions.yaml").write_text(
        "defaults: {precisions: [Q8_0, Q4_K_M], pairs: [cpu]}\n"
        "check: {CPU_LLM_LLAMA: {backend: local}}\n"
        "models: [{path: models/tiny, name: tiny}]\n",
        encoding="utf-8",
    )
    return root


def job_dir(workspace: Path, tmp_path: Path, name: str) -> Path:
    """A fresh runner workspace for one job: the checkout, nothing else."""
    folder = tmp_path / name
    shutil.copytree(workspace, folder)
    return folder


@pytest.fixture(scope="module")
def made(workspace: Path, tmp_path_factory: pytest.TempPathFactory, cli_on_path: Path) -> tuple[dict, Path]:
    """plan, then the make job of its only make entry; returns (the plan's outputs, the artifact folder)."""
    tmp = tmp_path_factory.mktemp("jobs")
    plan_ws = job_dir(workspace, tmp, "plan")
    result = run_composite(action("plan"), {"install": "false"}, plan_ws, path_dir=cli_on_path)
    assert result["returncode"] == 0, result
    outputs = result["outputs"]
    (entry,) = json.loads(outputs["make"])["include"]
    make_ws = job_dir(workspace, tmp, "make")
    inputs = {"model": entry["model"], "revision": entry["revision"], "model-name": entry["name"],
              "precisions": entry["precisions"], "outdir": f"out/{entry['id']}", "install": "false",
              "fidelity-on": "check" if entry["fidelity_on"] == "check" else ""}  # fmt: skip
    result = run_composite(ROOT / "action.yml", inputs, make_ws, path_dir=cli_on_path)
    assert result["returncode"] == 0, result
    assert result["outputs"]["outdir"] == "out/tiny"
    assert result["outputs"]["files"].splitlines() == ["out/tiny/tiny.q8_0.gguf", "out/tiny/tiny.q4_k_m.gguf"]
    artifact = tmp / "artifacts" / f"make-{entry['id']}"  # upload-artifact
    shutil.copytree(make_ws / "out" / entry["id"], artifact)
    return outputs, artifact


def run_check(entry: dict, artifact: Path, tmp_path: Path, cli_on_path: Path, **extra: str) -> dict:
    ws = tmp_path / f"check-{entry['id']}"
    ws.mkdir()
    shutil.copytree(artifact, ws / "files")  # download-artifact
    inputs = {"path": "files", "pair": entry["pair"], "backend": entry["backend"], "image": entry["image"],
              "max-kld": entry["max_kld"], "min-top1": entry["min_top1"], "fidelity": entry["fidelity"],
              "record": f"checks/{entry['id']}.check.json", "install": "false", **extra}  # fmt: skip
    result = run_composite(action("check"), inputs, ws, path_dir=cli_on_path)
    result["record_path"] = ws / "checks" / f"{entry['id']}.check.json"
    return result


def run_publish(server: FakeGitHubServer, artifacts: Path, checks: Path, plan: dict, tmp_path: Path, cli: Path) -> dict:
    ws = tmp_path / "publish"
    ws.mkdir(parents=True, exist_ok=True)
    inputs = {"path": f"{artifacts}/*", "checks": str(checks), "expected-checks": plan["check"], "tag": "v0.1.0",
              "repository": REPO, "github-token": TOKEN, "install": "false"}  # fmt: skip
    return run_composite(action("publish"), inputs, ws, path_dir=cli, env={"GITHUB_API_URL": server.api_url})


def test_make_once_check_on_the_pair_publish_once_and_a_rerun_uploads_nothing(
    made: tuple[dict, Path], tmp_path: Path, cli_on_path: Path
) -> None:
    plan, artifact = made
    (entry,) = json.loads(plan["check"])["include"]
    result = run_check(entry, artifact, tmp_path, cli_on_path)
    assert result["returncode"] == 0, result
    assert result["outputs"]["passed"] == "true"
    assert "### Check CPU_LLM_LLAMA: ✅ passed" in result["summary"]
    checks = tmp_path / "checks-artifacts"
    checks.mkdir()
    shutil.copy(result["record_path"], checks)  # upload-artifact, then download-artifact (merge-multiple)
    with FakeGitHubServer(REPO, TOKEN) as server:
        published = run_publish(server, artifact.parent, checks, plan, tmp_path, cli_on_path)
        assert published["returncode"] == 0, published
        release = server.release_by_tag("v0.1.0")
        assert not release["draft"]
        names = server.asset_names(release["id"])
        assert names == sorted([CHECKSUMS_NAME, "tiny.manifest.json", "tiny.q4_k_m.gguf", "tiny.q8_0.gguf"])
        manifest = json.loads(server.asset_data(release["id"], "tiny.manifest.json"))
        record = manifest["checks"]["CPU_LLM_LLAMA"]
        assert record["passed"] and record["runtime"]["device"] == "cpu" and record["runtime"]["backend"] == "local"
        sums = parse_checksums(server.asset_data(release["id"], CHECKSUMS_NAME).decode())
        for name in ("tiny.q8_0.gguf", "tiny.q4_k_m.gguf"):
            assert sums[name] == next(f["sha256"] for f in manifest["files"] if f["name"] == name)
        assert "| File | CPU_LLM_LLAMA |" in release["body"]
        # The whole flow again for the same tag: a new make (same bytes), a new check (other speeds).
        uploads = [p for m, p, _ in server.requests if m == "POST" and "/uploads/" in p]
        (tmp_path / "again").mkdir()
        again = run_check(entry, artifact, tmp_path / "again", cli_on_path)
        assert again["returncode"] == 0, again
        shutil.copy(again["record_path"], checks)
        second = run_publish(server, artifact.parent, checks, plan, tmp_path / "again", cli_on_path)
        assert second["returncode"] == 0, second
        assert json.loads(second["outputs"]["uploaded"]) == []
        assert [p for m, p, _ in server.requests if m == "POST" and "/uploads/" in p] == uploads


def test_a_check_that_disagrees_leaves_the_release_a_draft(
    made: tuple[dict, Path], tmp_path: Path, cli_on_path: Path
) -> None:
    plan, artifact = made
    (entry,) = json.loads(plan["check"])["include"]
    # One runtime on one machine agrees with itself exactly, so the disagreement is planted in the reference the
    # check job downloads: the Q4_K_M file's rows are what the Q8_0 file predicts (its own sha256 kept), as a
    # runtime that computes other numbers would see it. The limits ask for less than nothing on top.
    altered = tmp_path / "altered" / artifact.name
    shutil.copytree(artifact, altered)
    ref = json.loads((altered / REFERENCE_NAME).read_text())
    q8, q4 = "tiny.q8_0.gguf", "tiny.q4_k_m.gguf"
    ref["files"][q4] = {**ref["files"][q8], "sha256": ref["files"][q4]["sha256"]}
    (altered / REFERENCE_NAME).write_text(json.dumps(ref))
    result = run_check({**entry, "min_top1": "1", "max_kld": "0"}, altered, tmp_path, cli_on_path)
    record = json.loads(result["record_path"].read_text())
    assert record["passed"] is False, record
    assert result["returncode"] == 1
    assert "::error title=cecai-converter%3A check failed::" in result["stdout"]
    checks = tmp_path / "checks-artifacts"
    checks.mkdir()
    shutil.copy(result["record_path"], checks)
    with FakeGitHubServer(REPO, TOKEN) as server:
        published = run_publish(server, artifact.parent, checks, plan, tmp_path, cli_on_path)
        assert published["returncode"] == 1
        release = server.release_by_tag("v0.1.0")
        assert release["draft"]
        assert "tiny.q8_0.gguf" in server.asset_names(release["id"])


@pytest.mark.engine
@engine
def test_the_same_check_in_the_cpu_image_through_the_docker_backend(
    made: tuple[dict, Path], tmp_path: Path, cli_on_path: Path, cpu_image: str
) -> None:
    plan, artifact = made
    (entry,) = json.loads(plan["check"])["include"]
    (tmp_path / "local").mkdir()
    local = run_check(entry, artifact, tmp_path / "local", cli_on_path)
    assert local["returncode"] == 0, local
    result = run_check({**entry, "backend": "docker", "image": cpu_image}, artifact, tmp_path, cli_on_path)
    assert result["returncode"] == 0, result
    record = json.loads(result["record_path"].read_text())
    assert record["passed"] and record["runtime"]["backend"] == "docker" and record["runtime"]["image"] == cpu_image
    ours = json.loads(local["record_path"].read_text())
    for in_image, here in zip(record["files"], ours["files"], strict=True):
        assert in_image["sha256"] == here["sha256"] and in_image["sha256_match"]
        # the image's llama.cpp build and this machine's agree with the builder's runtime alike
        assert in_image["agreement"]["top1_agreement"] == here["agreement"]["top1_agreement"] == 1.0
        assert in_image["agreement"]["kld_mean"] < 1e-4
