"""This project's own release (.github/workflows/release.yml and scripts/lib/release.py): the version check refuses
any place that disagrees, the notes are CHANGELOG.md's section, the workflow runs the steps in order with the least
permissions, and its publishing scripts do what they say against a stand-in `gh`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "lib" / "release.py"
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
IMAGES = ROOT / ".github" / "workflows" / "images.yml"
sys.path.insert(0, str(SCRIPT.parent))
import release  # noqa: E402 (a script's module, found through the path above)

from cecai_converter import __version__  # noqa: E402

CHANGELOG = f"""# Changelog

Intro text.

## [{__version__}] — 2026-12-03

### Added
- The first thing.

```md
## not a heading: inside a fence
```

## [0.0.9] — 2026-01-01
- Older.
"""


def _project(tmp_path: Path) -> Path:
    """A copy of every file the version check reads, with a CHANGELOG whose top section is this version's."""
    root = tmp_path / "project"
    for rel in ("pyproject.toml", "README.md", "action.yml", "docker-bake.hcl"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    for rel in ("docs", "actions", "images", ".github/workflows", "examples", "scripts/lib", "src/cecai_converter"):
        shutil.copytree(ROOT / rel, root / rel, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "CHANGELOG.md").write_text(CHANGELOG, encoding="utf-8")
    return root


def _run(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True, check=False
    )


# -- the version check --------------------------------------------------------------------------------------------
def test_agreeing_versions_pass_and_give_the_later_jobs_their_values(tmp_path: Path) -> None:
    root = _project(tmp_path)
    output = tmp_path / "github_output"
    proc = _run("check-version", "--tag", f"v{__version__}", "--github-output", str(output), root=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DIFFERS" not in proc.stdout
    for where in (
        "pyproject.toml",
        "__version__",
        "docker-bake.hcl",
        "images/Dockerfile",
        "default image",
        "CHANGELOG",
    ):
        assert where in proc.stdout
    major = "v" + __version__.split(".")[0]
    assert output.read_text().splitlines() == [f"version={__version__}", f"tag=v{__version__}", f"major={major}"]


def test_a_version_bumped_in_pyproject_alone_is_refused_naming_every_other_place(tmp_path: Path) -> None:
    root = _project(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(f'version = "{__version__}"', 'version = "9.8.7"', 1))
    (root / "CHANGELOG.md").write_text(CHANGELOG.replace(f"[{__version__}]", "[9.8.7]"))
    output = tmp_path / "github_output"
    proc = _run("check-version", "--tag", "v9.8.7", "--github-output", str(output), root=root)
    assert proc.returncode == 1
    assert "disagree with pyproject.toml's version 9.8.7" in proc.stderr
    differs = [line for line in proc.stdout.splitlines() if line.strip().startswith("DIFFERS")]
    named = " ".join(differs)
    for where in ("src/cecai_converter/__init__.py", "docker-bake.hcl", "images/Dockerfile", "default image",
                  "docs/images.md:"):  # fmt: skip
        assert where in named, where
    assert "the release tag" not in named and "CHANGELOG" not in named
    assert not output.exists(), "nothing for the later jobs when the check fails"


def test_a_tag_other_than_the_version_is_refused(tmp_path: Path) -> None:
    proc = _run("check-version", "--tag", "v99.0.0", root=_project(tmp_path))
    assert proc.returncode == 1
    assert any(line.strip().startswith("DIFFERS") and "the release tag" in line for line in proc.stdout.splitlines())


@pytest.mark.parametrize("tag", ["1.0.0", "v1.0", "v1.0.0-rc1", "v01.0.0", "release"])
def test_a_tag_that_is_not_vxyz_is_bad_input(tmp_path: Path, tag: str) -> None:
    proc = _run("check-version", "--tag", tag, root=_project(tmp_path))
    assert proc.returncode == 2
    assert f"release tag {tag!r} is not vX.Y.Z" in proc.stderr and "hint:" in proc.stderr


def test_a_stale_image_tag_in_the_docs_is_named_with_its_line(tmp_path: Path) -> None:
    root = _project(tmp_path)
    doc = root / "docs" / "runners-extra.md"
    doc.write_text("intro\n\n    docker pull ghcr.io/cecai/cecai-converter:0.0.1-cpu\n")
    proc = _run("check-version", root=root)
    assert proc.returncode == 1
    assert any("docs/runners-extra.md:3" in line and "DIFFERS" in line for line in proc.stdout.splitlines())


def test_a_changelog_still_headed_unreleased_is_refused_with_the_rename_to_make(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / "CHANGELOG.md").write_text(CHANGELOG.replace(f"## [{__version__}] — 2026-12-03", "## [Unreleased]"))
    proc = _run("check-version", root=root)
    assert proc.returncode == 1
    assert 'rename "## [Unreleased]"' in proc.stdout and "CHANGELOG.md" in proc.stderr


def test_in_this_checkout_every_place_but_an_unreleased_changelog_agrees() -> None:
    """A version changed in one place only fails here, long before a release."""
    _, rows = release.check_version(ROOT)
    assert len(rows) > 10
    assert [place.where for place, good in rows if not good] in ([], ["CHANGELOG.md"])


# -- the notes ----------------------------------------------------------------------------------------------------
def test_the_notes_are_the_versions_changelog_section() -> None:
    notes = release.changelog_section(CHANGELOG, __version__)
    assert notes.startswith("### Added\n- The first thing.")
    assert "## not a heading: inside a fence" in notes, "a heading inside a code fence does not end the section"
    assert "Older" not in notes and "Intro" not in notes
    assert release.changelog_section(CHANGELOG, "0.0.9") == "- Older.\n"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("# Changelog\n\n## [Unreleased] — 1.2.3\n- x\n", 'rename "## [Unreleased] — 1.2.3"'),
        ("# Changelog\n\n## [1.2.30]\n- x\n", 'head the release\'s section "## [1.2.3] — YYYY-MM-DD"'),
        ("# Changelog\n\n## [1.2.3] — 2026-01-01\n\n## [1.2.2]\n- x\n", "list the release's changes"),
    ],
)
def test_no_section_for_the_version_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(release.ReleaseError) as info:
        release.changelog_section(text, "1.2.3")
    assert fragment in info.value.hint


def test_notes_on_the_command_line(tmp_path: Path) -> None:
    root = _project(tmp_path)
    proc = _run("notes", __version__, root=root)
    assert proc.returncode == 0 and proc.stdout == release.changelog_section(CHANGELOG, __version__)
    proc = _run("notes", "7.7.7", root=root)
    assert proc.returncode == 1 and "CHANGELOG.md has no section headed 7.7.7" in proc.stderr


# -- the workflow -------------------------------------------------------------------------------------------------
def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def _step(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(step for step in job["steps"] if step.get("name") == name)


def test_the_release_runs_on_version_tags_only_and_in_order() -> None:
    doc = _load(WORKFLOW)
    assert doc["on"] == {"push": {"tags": ["v*.*.*"]}}
    jobs = doc["jobs"]
    assert set(jobs) == {"versions", "images", "publish"}
    assert jobs["images"]["needs"] == "versions"
    assert sorted(jobs["publish"]["needs"]) == ["images", "versions"]
    check = _step(jobs["versions"], "Check the version")
    assert check["env"] == {"TAG": "${{ github.ref_name }}"}
    assert (
        'release.py check-version --tag "$TAG"' in check["run"] and '--github-output "$GITHUB_OUTPUT"' in check["run"]
    )
    assert 'release.py notes "${TAG#v}"' in check["run"], "a missing changelog section stops the release first"


def test_the_images_are_built_by_images_yml_called_with_push_and_the_checked_version() -> None:
    images_job = _load(WORKFLOW)["jobs"]["images"]
    assert images_job["uses"] == "./.github/workflows/images.yml"
    assert images_job["with"] == {"push": True, "version": "${{ needs.versions.outputs.version }}"}
    assert images_job["permissions"] == {"contents": "read", "packages": "write"}
    images = _load(IMAGES)
    assert "push" not in images["on"], "a tag push would build the images twice (release.yml calls images.yml)"
    assert images["on"]["workflow_call"]["inputs"]["push"] == {
        "description": images["on"]["workflow_call"]["inputs"]["push"]["description"],
        "type": "boolean",
        "default": False,
    }
    steps = images["jobs"]["bake"]["steps"]
    login = next(s for s in steps if str(s.get("uses", "")).startswith("docker/login-action@"))
    bake = next(s for s in steps if str(s.get("uses", "")).startswith("docker/bake-action@"))
    assert login["if"] == "inputs.push" and bake["with"]["push"] == "${{ inputs.push == true }}"


def test_images_yml_refuses_a_version_other_than_pyprojects(tmp_path: Path) -> None:
    step = _step(_load(IMAGES)["jobs"]["bake"], "Image coordinates")
    output = tmp_path / "out"
    env = {
        "PATH": os.environ["PATH"],
        "REPOSITORY": "o/cecai-converter",
        "REF_TYPE": "tag",
        "GITHUB_OUTPUT": str(output),
    }
    for version, code in ((__version__, 0), ("9.9.9", 1)):
        env.update(REF_NAME=f"v{version}", INPUT_VERSION=version)
        proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == code, proc.stdout + proc.stderr
    assert "asked to build version 9.9.9" in proc.stdout


def test_publish_has_only_contents_write_and_its_token_through_env() -> None:
    jobs = _load(WORKFLOW)["jobs"]
    assert jobs["versions"]["permissions"] == {"contents": "read"}
    assert jobs["publish"]["permissions"] == {"contents": "write"}
    for step in jobs["publish"]["steps"]:
        if "run" in step:
            assert step["env"]["GH_TOKEN"] == "${{ github.token }}"
            assert "${{" not in step["run"]
        else:
            assert step["with"]["persist-credentials"] is False


def _fake_gh(tmp_path: Path, existing: set[str]) -> tuple[dict[str, str], Path]:
    """A `gh` stand-in first on PATH: it records each call, answers `api repos/…/git/ref/tags/X` and `release view X`
    with success for X in ``existing`` (failure otherwise), and keeps the file given as --notes-file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gh-calls"
    gh = bin_dir / "gh"
    gh.write_text(
        f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> '{calls}'
known=' {" ".join(sorted(existing))} '
if [[ "$1 $2" == "release view" ]]; then [[ "$known" == *" $3 "* ]]; exit; fi
if [[ "$1" == api && "$2" == repos/*/git/ref/tags/* ]]; then [[ "$known" == *" ${{2##*/}} "* ]]; exit; fi
prev=""
for arg in "$@"; do [[ "$prev" == --notes-file ]] && cp "$arg" '{tmp_path}/notes-given'; prev="$arg"; done
""",
        encoding="utf-8",
    )
    gh.chmod(gh.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RUNNER_TEMP": str(tmp_path)}
    return env, calls


def _run_publish_step(
    name: str, tmp_path: Path, existing: set[str], env: dict[str, str], cwd: Path = ROOT
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run one step of the publish job for real (bash -e, as GitHub runs it) with the `gh` stand-in."""
    step = _step(_load(WORKFLOW)["jobs"]["publish"], name)
    fake_env, calls = _fake_gh(tmp_path, existing)
    proc = subprocess.run(
        ["bash", "-e", "-c", step["run"]], cwd=cwd, env={**fake_env, **env}, capture_output=True, text=True
    )
    return proc, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("exists", [True, False])
def test_the_major_tag_is_moved_or_created_at_the_release_commit(tmp_path: Path, exists: bool) -> None:
    sha = "a" * 40
    env = {"GH_TOKEN": "t", "REPOSITORY": "octo/cecai-converter", "MAJOR": "v1", "SHA": sha}
    proc, calls = _run_publish_step("Move the major tag", tmp_path, {"v1"} if exists else set(), env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls[0] == "api repos/octo/cecai-converter/git/ref/tags/v1 --silent"
    if exists:
        assert calls[1:] == [
            f"api --method PATCH repos/octo/cecai-converter/git/refs/tags/v1 -f sha={sha} -F force=true --silent"
        ]
    else:
        assert calls[1:] == [
            f"api --method POST repos/octo/cecai-converter/git/refs -f ref=refs/tags/v1 -f sha={sha} --silent"
        ]


@pytest.mark.parametrize("exists", [False, True])
def test_the_release_is_published_with_the_changelog_section(tmp_path: Path, exists: bool) -> None:
    root = _project(tmp_path)
    tag = f"v{__version__}"
    env = {"GH_TOKEN": "t", "GH_REPO": "octo/cecai-converter", "TAG": tag, "VERSION": __version__}
    proc, calls = _run_publish_step("Publish the release", tmp_path, {tag} if exists else set(), env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls[0] == f"release view {tag}"
    if exists:  # a re-run: the release it made before gets the notes and is published
        assert calls[1:] == [f"release edit {tag} --title {tag} --notes-file {tmp_path}/release-notes.md --draft=false"]
    else:
        assert calls[1:] == [
            f"release create {tag} --verify-tag --title {tag} --notes-file {tmp_path}/release-notes.md"
        ]
    assert (tmp_path / "notes-given").read_text(encoding="utf-8") == release.changelog_section(CHANGELOG, __version__)


def test_no_release_without_a_changelog_section(tmp_path: Path) -> None:
    root = _project(tmp_path)
    env = {"GH_TOKEN": "t", "GH_REPO": "octo/cecai-converter", "TAG": "v7.7.7", "VERSION": "7.7.7"}
    proc, calls = _run_publish_step("Publish the release", tmp_path, set(), env, cwd=root)
    assert proc.returncode == 1 and calls == []
    assert "CHANGELOG.md has no section headed 7.7.7" in proc.stderr


# -- the version job under a real runner --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("tag", "passes"), [(f"v{__version__}", True), ("v99.0.0", False)])
def test_the_version_job_under_act(tmp_path: Path, tag: str, passes: bool, act: str) -> None:
    """The `versions` job run by nektos/act in a copy of the project tagged `tag` (about 30 s: it installs the
    package); the images and publish jobs need GitHub and are left out (`--job versions`)."""
    from act_harness import copy_project, init_repo, job_env, run_act, runner_labels

    repo = copy_project(tmp_path / "repo")
    (repo / "CHANGELOG.md").write_text(CHANGELOG, encoding="utf-8")
    init_repo(repo, remote="https://github.com/octo/cecai-converter.git", tag=tag)
    run = run_act(
        repo,
        workflow=".github/workflows/release.yml",
        event="push",
        payload={"ref": f"refs/tags/{tag}", "ref_name": tag, "repository": {"full_name": "octo/cecai-converter"}},
        labels=runner_labels(WORKFLOW),
        env=job_env(artifacts=tmp_path / "artifacts", api_url="http://127.0.0.1:9", wheels=tmp_path / "wheels"),
        secrets={},
        work=tmp_path / "act",
        timeout=300,
        act=act,
        job="versions",
    )
    results = run.job_results()
    assert list(results.values()) == (["succeeded"] if passes else ["failed"]), run.tail(6000)
    assert ("ok       the release tag" if passes else "DIFFERS  the release tag") in run.log
