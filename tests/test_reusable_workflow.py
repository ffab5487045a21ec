"""The release workflow as a reusable workflow (`uses: OWNER/cecai-converter/.github/workflows/release-convert.yml@v1`).

Called from another repository, the workflow's jobs run in the *caller's* checkout: a ``pip install .`` there, or a
``uses: ./actions/x``, would install or run the caller's repository instead of cecai-converter. So every job checks
out this project at the workflow's own commit (``job.workflow_repository`` at ``job.workflow_sha``) into
``.cecai-converter/`` and takes the actions and the package from there.

* Static tests (fast): no step of the workflow or of the composite actions installs the working directory; every
  local action of the workflow comes from that checkout; the checkout names the workflow's own repository and commit.
* Under act (slow, tests/act_harness.py): a separate "user repository" holding only ``conversions.yaml``, a tiny model
  and a short calling workflow; this project, committed and tagged ``v1``, is mapped as the remote
  ``cecai/cecai-converter@v1`` (``--local-repository``), so act resolves the ``uses:`` line as GitHub does. The run
  covers plan → make → check → publish against the GitHub API stand-in, then a second run uploads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
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
    local_repository_args,
    release_checksums,
    release_uploads,
    require_cached_wheel,
    run_act,
    shared_site_packages,
    third_party_refs,
)
from github_stand_in import FakeGitHubServer

WORKFLOW = ROOT / ".github" / "workflows" / "release-convert.yml"
ACTIONS = [ROOT / "action.yml", *sorted((ROOT / "actions").glob("*/action.yml"))]
#: Where each job of the workflow checks out this project (the workflow's own repository at its own commit).
SELF = ".cecai-converter"


# ------------------------------------------------------------------------------------------------ static checks


def _steps(doc: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for step in (doc.get("runs") or {}).get("steps") or []:
        yield "runs", step
    for name, job in (doc.get("jobs") or {}).items():
        for step in job.get("steps") or []:
            yield name, step


#: A pip target that is the working directory: `.`, `./`, `.[sign]`, `"$GITHUB_WORKSPACE"`, `${GITHUB_WORKSPACE}[x]`.
_WORKDIR_TARGET = re.compile(r"^(\.|\./|\$\{?GITHUB_WORKSPACE\}?/?)(\[[^\]]*\])?$")
_PIP_INSTALL = re.compile(r"\bpip3?\s+install\b")


def workdir_installs(script: str) -> list[str]:
    """The ``pip install`` commands of a shell script that install the working directory (the caller's checkout).

    Continuation lines are joined; each command after ``pip install`` is split as the shell would, and a target that
    is ``.`` (with or without extras, after ``-e``/``--editable`` or not) or ``$GITHUB_WORKSPACE`` counts.
    """
    found: list[str] = []
    joined = script.replace("\\\n", " ")
    for line in joined.splitlines():
        for command in re.split(r"&&|\|\||;", line):
            match = _PIP_INSTALL.search(command)
            if not match:
                continue
            try:
                words = shlex.split(command[match.end() :], comments=True, posix=True)
            except ValueError:
                words = command[match.end() :].split()
            if any(_WORKDIR_TARGET.match(word) for word in words):
                found.append(command.strip())
    return found


def test_the_install_check_catches_installs_of_the_working_directory():
    """The checker itself: each form of `install .` is caught; installs of another folder or of a package are not."""
    caught = [
        'pip install ".[sign]"',
        "python -m pip install --quiet .",
        "pip install -e .",
        "pip install --editable './'",
        '"$venv/bin/python" -m pip install --disable-pip-version-check \\\n  ".[local]"',
        'pip install "$GITHUB_WORKSPACE[sign]"',
        "cd x && pip3 install ${GITHUB_WORKSPACE}",
        # the signing step as it was before the workflow became reusable
        '"$(dirname "$(command -v cecai-convert)")/python" -m pip install --quiet --disable-pip-version-check \\\n'
        '  ".[sign]"',
    ]
    for script in caught:
        assert workdir_installs(script), script
    allowed = [
        'pip install "$CECAI_SOURCE[sign]"',
        'pip install "$GITHUB_WORKSPACE/.cecai-converter[sign]"',
        'pip install --find-links "$wheels" "$spec"',
        "pip install model-signing",
        "pip wheel --no-deps -w . llama-cpp-python==0.3.36",
    ]
    for script in allowed:
        assert not workdir_installs(script), script


@pytest.mark.parametrize("path", [WORKFLOW, *ACTIONS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_step_installs_the_callers_checkout(path):
    """A step of the reusable workflow or of a composite action runs in the caller's repository: installing `.` there
    installs the caller's code, not cecai-converter (the signing step once did: `pip install ".[sign]"`)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    bad = [(job, step.get("name") or step.get("id"), cmd) for job, step in _steps(doc) for cmd in workdir_installs(
        step.get("run") or ""
    )]  # fmt: skip
    assert not bad, f"{path.name}: steps install the working directory (the caller's checkout): {bad}"


def _workflow() -> dict[str, Any]:
    return dict(yaml.safe_load(WORKFLOW.read_text(encoding="utf-8")))


def test_the_workflow_can_be_called_and_keeps_its_own_triggers():
    on = _workflow()[True]  # YAML 1.1 reads the key `on` as True
    assert "push" in on and "workflow_dispatch" in on, "the tag push and the manual run must keep working"
    call = on["workflow_call"]
    assert set(call["inputs"]) == {"batch", "tag", "check-backend", "image-owner", "runner-labels", "builder-labels"}
    for name, spec in call["inputs"].items():
        assert spec.get("type") == "string" and spec.get("description"), name
        assert spec.get("required") is not True, f"{name}: the short calling workflow needs no input"
    assert set(call["secrets"]) == {"HF_TOKEN"}
    assert call["secrets"]["HF_TOKEN"].get("required") is False


def test_every_job_runs_this_project_from_its_own_checkout():
    """Each job that runs one of our actions first checks out the workflow's own repository at the workflow's own
    commit into .cecai-converter/ (never the caller's ref), checks that it is cecai-converter, and takes every local
    action from there."""
    text = WORKFLOW.read_text(encoding="utf-8")
    jobs = _workflow()["jobs"]
    assert jobs
    for name, job in jobs.items():
        steps = job["steps"]
        local = [s["uses"] for s in steps if str(s.get("uses", "")).startswith(("./", "$/"))]
        assert local, f"job {name} runs none of our actions"
        for uses in local:
            assert uses.startswith(f"./{SELF}/actions/"), f"job {name}: {uses} would run the caller's repository"
        checkouts = [s for s in steps if str(s.get("uses", "")).startswith("actions/checkout@")]
        own = [s for s in checkouts if (s.get("with") or {}).get("path") == SELF]
        assert len(own) == 1, f"job {name}: no checkout of cecai-converter into {SELF}/"
        with_ = own[0]["with"]
        assert with_["repository"] == "${{ job.workflow_repository }}", with_
        assert with_["ref"] == "${{ job.workflow_sha }}", with_
        assert with_["persist-credentials"] is False
        first_local = min(i for i, s in enumerate(steps) if str(s.get("uses", "")).startswith("./"))
        verify = [i for i, s in enumerate(steps) if s.get("name") == VERIFY_STEP]
        assert verify and steps.index(own[0]) < verify[0] < first_local, f"job {name}: checkout, check, then use"
        # the caller's own checkout (its batch file and local models) comes first: a checkout into `.` empties the
        # workspace, .cecai-converter/ included
        assert checkouts.index(own[0]) == len(checkouts) - 1, name
    assert text.count(f"path: {SELF}") == len(jobs)


VERIFY_STEP = "cecai-converter at this workflow's own commit"


def test_the_signing_step_installs_this_project_from_its_checkout():
    steps = {s.get("name"): s for s in _workflow()["jobs"]["publish"]["steps"]}
    sign = steps["Sign the release's files (model.sig)"]
    assert f'"$GITHUB_WORKSPACE/{SELF}[sign]"' in sign["run"], sign["run"]


# ------------------------------------------------------------------------------------------------ the scripts, run


def _bash(script: str, env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "CECAI_", "ACT"))}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def _verify_step(job: str = "check") -> Mapping[str, Any]:
    (step,) = [s for s in _workflow()["jobs"][job]["steps"] if s.get("name") == VERIFY_STEP]
    return step


@pytest.mark.parametrize(
    ("workflow_repository", "image_owner", "image_repo"),
    [
        ("Fork-Owner/cecai-converter", "", "ghcr.io/fork-owner/cecai-converter"),
        ("cecai/cecai-converter", "My-Org", "ghcr.io/my-org/cecai-converter"),
        ("someone/Renamed-Converter", "", "ghcr.io/someone/renamed-converter"),
    ],
)
def test_the_workflow_pulls_the_images_of_its_own_repository(tmp_path, workflow_repository, image_owner, image_repo):
    """The verify step (run as the runner would) sets CECAI_IMAGE_REPO from job.workflow_repository, or image-owner;
    the docker backend then pulls that repository's tag for the pair."""
    from cecai_converter.backends.container_spec import default_image
    from cecai_converter.pairs import PAIRS

    (tmp_path / SELF).mkdir()
    (tmp_path / SELF / "pyproject.toml").write_text('[project]\nname = "cecai-converter"\n')
    github_env = tmp_path / "github_env"
    github_env.touch()
    env = {"WORKFLOW_REPOSITORY": workflow_repository, "WORKFLOW_SHA": "a" * 40, "IMAGE_OWNER": image_owner}
    proc = _bash(_verify_step()["run"], {**env, "GITHUB_ENV": str(github_env)}, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert github_env.read_text() == f"CECAI_IMAGE_REPO={image_repo}\n"
    tag = default_image(PAIRS["GPU_LLM_LLAMA"], {"CECAI_IMAGE_REPO": image_repo})
    assert tag.startswith(f"{image_repo}:") and tag.endswith("-gpu"), tag


@pytest.mark.parametrize(
    ("env", "pyproject", "code", "message"),
    [
        # a runner that does not fill job.workflow_*: the checkout would have taken the caller's repository
        ({"WORKFLOW_REPOSITORY": "", "WORKFLOW_SHA": ""}, "cecai-converter", 1, "runner too old"),
        # the caller's repository checked out in .cecai-converter/ instead of ours
        ({"WORKFLOW_REPOSITORY": "octo/app", "WORKFLOW_SHA": "b" * 40}, "my-app", 1, "wrong checkout"),
        ({"WORKFLOW_REPOSITORY": "o/cecai-converter", "WORKFLOW_SHA": "c" * 40, "IMAGE_OWNER": "x\ny=1"},
         "cecai-converter", 2, "image-owner must be"),
    ],
)  # fmt: skip
def test_the_verify_step_stops_a_job_on_the_wrong_code(tmp_path, env, pyproject, code, message):
    (tmp_path / SELF).mkdir()
    (tmp_path / SELF / "pyproject.toml").write_text(f'[project]\nname = "{pyproject}"\n')
    github_env = tmp_path / "github_env"
    github_env.touch()
    proc = _bash(_verify_step("publish")["run"], {"IMAGE_OWNER": "", **env, "GITHUB_ENV": str(github_env)}, tmp_path)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "::error title=cecai-converter: " in proc.stdout and message in proc.stdout, proc.stdout
    assert github_env.read_text() == ""


@pytest.mark.parametrize("path", ["action.yml", "actions/convert/action.yml", "actions/check/action.yml"])
@pytest.mark.parametrize(
    ("action_repository", "preset", "expected"),
    [
        ("My-Fork/cecai-converter", "", "ghcr.io/my-fork/cecai-converter"),
        ("cecai/cecai-converter", "", "ghcr.io/cecai/cecai-converter"),
        ("My-Fork/cecai-converter", "registry.example/mirror/cc", "registry.example/mirror/cc"),
        ("", "", ""),  # a local `./` action: the package's default
    ],
)
def test_the_actions_pull_the_images_of_their_own_repository(tmp_path, path, action_repository, preset, expected):
    """The step that runs `cecai-convert gha …` (its env: evaluated as the runner would, with github.action_repository
    as GitHub sets it for `uses: OWNER/cecai-converter…@v1`) hands the CLI CECAI_IMAGE_REPO of that repository."""
    doc = yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))
    (step,) = [
        s for s in doc["runs"]["steps"] if re.search(r"cecai-convert gha (convert|check)$", s.get("run", ""), re.M)
    ]
    env = {}
    for key, value in (step.get("env") or {}).items():
        value = str(value).replace("${{ github.action_repository }}", action_repository)
        env[key] = "" if "${{" in value else value  # the inputs: empty here
    assert env["ACTION_REPOSITORY"] == action_repository
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cecai-convert").write_text('#!/bin/sh\necho "image repo: ${CECAI_IMAGE_REPO:-}"\n')
    (fake / "cecai-convert").chmod(0o755)
    env["PATH"] = f"{fake}{os.pathsep}{os.environ['PATH']}"
    if preset:
        env["CECAI_IMAGE_REPO"] = preset
    proc = _bash(step["run"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip("\n") == f"image repo: {expected}"


# ------------------------------------------------------------------------------------------------ under act

OWNER_REPO = "cecai/cecai-converter"
USER_REPOSITORY = "octo/user-models"
TAG = "v2.0"
MODEL = "tiny-llama"
PRECISIONS = ("Q8_0",)
PAIR = "CPU_LLM_LLAMA"
#: Labels the calling workflow asks for instead of the pair's defaults: only these are mapped to this host, so the
#: jobs run only if the overrides reached `runs-on`.
BUILDER_LABELS = ["user-builder"]
CHECK_LABELS = ["user-cpu-check"]
ACT_TIMEOUT = 480

BATCH = f"""\
version: 1
models:
  - path: models/{MODEL}
    name: {MODEL}
    precisions: [{", ".join(PRECISIONS)}]
    pairs: [{PAIR}]
"""

CALLER = f"""\
name: release
on:
  push:
    tags: ["v*"]
permissions: {{}}
jobs:
  release:
    uses: {OWNER_REPO}/.github/workflows/release-convert.yml@v1
    permissions:
      contents: write
      id-token: write
      attestations: write
    with:
      check-backend: local
      builder-labels: '{json.dumps(BUILDER_LABELS)}'
      runner-labels: '{json.dumps({PAIR: CHECK_LABELS})}'
    secrets:
      HF_TOKEN: ${{{{ secrets.HF_TOKEN }}}}
"""


def _succeeded(run: ActRun, what: str) -> None:
    results = assert_succeeded(run, what)
    assert len(results) >= 4, f"{what}: expected plan, make, check and publish, got {sorted(results)}"


@pytest.mark.slow
def test_a_user_repository_calls_the_reusable_workflow_under_act(act, tmp_path, model_factory):
    require_cached_wheel()
    # This project as the remote the `uses:` line names: committed, tagged v1.
    project = copy_project(tmp_path / "cecai-converter")
    init_repo(project, remote=f"https://github.com/{OWNER_REPO}.git", tag="v1")
    # The user's repository: a batch file, a model, the calling workflow. Nothing of cecai-converter.
    user = tmp_path / "user"
    shutil.copytree(model_factory("llama"), user / "models" / MODEL)
    (user / "conversions.yaml").write_text(BATCH, encoding="utf-8")
    (user / ".github" / "workflows").mkdir(parents=True)
    (user / ".github" / "workflows" / "release.yml").write_text(CALLER, encoding="utf-8")
    init_repo(user, remote=f"https://github.com/{USER_REPOSITORY}.git", tag=TAG)
    assert not (user / "pyproject.toml").exists() and not (user / "actions").exists()

    # The reusable workflow and every third-party action it (and our composite actions) use, mapped locally.
    extra = ["--local-repository", f"{OWNER_REPO}@v1={project}"]
    extra += local_repository_args(third_party_refs(project / ".github" / "workflows" / "release-convert.yml", project))
    labels = {"ubuntu-24.04", *BUILDER_LABELS, *CHECK_LABELS}
    site_packages = shared_site_packages(tmp_path / "site-packages")
    payload = {"ref": f"refs/tags/{TAG}", "ref_name": TAG, "repository": {"full_name": USER_REPOSITORY}}

    with FakeGitHubServer(repo=USER_REPOSITORY) as server:

        def run(n: int) -> ActRun:
            return run_act(
                user,
                workflow=".github/workflows/release.yml",
                event="push",
                payload=payload,
                labels=labels,
                env=job_env(
                    artifacts=tmp_path / f"artifacts-{n}",
                    api_url=server.api_url,
                    wheels=tmp_path / "wheels",
                    site_packages=site_packages,
                    # act has no job.workflow_* context: the checkout stand-in lays this project's commit in
                    # .cecai-converter/, as GitHub's checkout of job.workflow_repository@job.workflow_sha would.
                    extra={"CECAI_ACT_WORKFLOW_SOURCE": str(project)},
                ),
                secrets={"GITHUB_TOKEN": server.token, "HF_TOKEN": "hf_not_a_real_token"},
                work=tmp_path / f"act-{n}",
                timeout=ACT_TIMEOUT,
                act=act,
                extra_args=extra,
            )

        first = run(1)
        _succeeded(first, "first run")
        assert f"LocalRepositoryCache matched https://github.com/{OWNER_REPO} with ref v1" in first.log
        # only the caller's label overrides are mapped to this host: a job on the batch's labels would be skipped
        assert "Skipping unsupported platform" not in first.log
        # every job installed cecai-converter from the checkout of the workflow's commit, never the user's repository
        assert f"checkout stand-in: {SELF} from {project}" in first.log
        assert "hf_not_a_real_token" not in first.log, "the HF_TOKEN secret reached the log"

        release = server.release_by_tag(TAG)
        assert release["draft"] is False, "the release was left a draft"
        rid = release["id"]
        names = [a["name"] for a in server.assets.values() if a["_release"] == rid]
        assert len(names) == len(set(names)), f"an asset was uploaded twice: {sorted(names)}"
        ggufs = sorted(n for n in names if n.endswith(".gguf"))
        assert len(ggufs) == len(PRECISIONS), ggufs
        sums = release_checksums(server, rid)
        assert set(ggufs) <= set(sums)
        for name in ggufs:
            assert hashlib.sha256(server.asset_data(rid, name)).hexdigest() == sums[name], name
        manifests = [n for n in names if n.endswith(".manifest.json")]
        assert manifests, sorted(names)
        manifest = json.loads(server.asset_data(rid, manifests[0]))
        text = json.dumps(manifest)
        assert PAIR in text and '"backend": "local"' in text, "no local check record for the pair in the manifest"
        assert PAIR in release["body"]

        before = release_uploads(server)
        second = run(2)
        _succeeded(second, "second run (same tag)")
        assert release_uploads(server) == before, "the second run uploaded again"
        assert server.release_by_tag(TAG)["draft"] is False
        assert len(server.releases) == 1
