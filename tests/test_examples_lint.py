"""The ready-to-copy workflows in examples/workflows/, held to what they call: the reusable release workflow's inputs,
secrets and permissions, and the convert action's inputs. actionlint and zizmor lint them with this repository's own
workflows (tests/test_workflows_lint.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from test_workflows_lint import _tool

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "workflows"
RELEASE_EXAMPLE = EXAMPLES / "release.yml"
CONVERT_EXAMPLE = EXAMPLES / "convert-on-push.yml"
REUSABLE = ROOT / ".github" / "workflows" / "release-convert.yml"
SHA_PIN = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
#: How the examples name this project (the reader replaces OWNER).
OURS = re.compile(r"^OWNER/cecai-converter(/[\w./-]+)?@v1$")


def _load(path: Path) -> dict[Any, Any]:
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def test_the_examples_are_there():
    assert RELEASE_EXAMPLE.is_file() and CONVERT_EXAMPLE.is_file()
    assert sorted(EXAMPLES.glob("*.yml")) == sorted([RELEASE_EXAMPLE, CONVERT_EXAMPLE])


def _actionlint_in(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("actionlint"), ".github/workflows/release.yml"], cwd=project, capture_output=True, text=True, check=False
    )


def test_actionlint_checks_the_release_example_against_the_reusable_workflow(tmp_path):
    """actionlint checks a call's inputs, secrets and types only for a workflow it can read: a user repository
    holding the example, calling this repository's release-convert.yml as a local file."""
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    (tmp_path / ".git").mkdir()  # actionlint reads local reusable workflows only inside a project (a .git folder)
    shutil.copy(REUSABLE, workflows / "release-convert.yml")
    shutil.copy(ROOT / ".github" / "actionlint.yaml", tmp_path / ".github" / "actionlint.yaml")
    text = RELEASE_EXAMPLE.read_text(encoding="utf-8")
    local = re.sub(r"uses: OWNER/cecai-converter/(\.github/workflows/release-convert\.yml)@v1", r"uses: ./\1", text)
    assert local != text
    # every optional input, uncommented, so that actionlint checks their names and types too
    local = re.sub(r"^([ ]+)# ([\w-]+: [^#\n]+?)[ ]*(#.*)?$", r"\1\2", local, flags=re.M)
    assert local.count("-labels: '") == 2, local
    (workflows / "release.yml").write_text(local, encoding="utf-8")
    proc = _actionlint_in(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the same check does fail on a wrong input name
    (workflows / "release.yml").write_text(local.replace("batch:", "batch-file:"), encoding="utf-8")
    proc = _actionlint_in(tmp_path)
    assert proc.returncode != 0 and "batch-file" in proc.stdout, proc.stdout + proc.stderr


def test_the_release_example_passes_what_the_reusable_workflow_takes():
    example = _load(RELEASE_EXAMPLE)
    call = _load(REUSABLE)[True]["workflow_call"]  # YAML 1.1 reads the key `on` as True
    (job,) = example["jobs"].values()
    assert OURS.match(job["uses"].split(" ")[0]), job["uses"]
    assert set(job.get("with") or {}) <= set(call["inputs"])
    assert set(job.get("secrets") or {}) <= set(call["secrets"])
    # the commented options name real inputs
    commented = re.findall(r"^\s+# ([\w-]+): ", RELEASE_EXAMPLE.read_text(encoding="utf-8"), re.M)
    assert commented and set(commented) <= set(call["inputs"]), commented
    # A called workflow's jobs get at most the caller's permissions: the caller grants each one they ask for.
    granted = job["permissions"]
    for name, called in _load(REUSABLE)["jobs"].items():
        for scope, level in (called.get("permissions") or {}).items():
            assert granted.get(scope) == "write" or granted.get(scope) == level, f"{name} needs {scope}: {level}"
    assert example["permissions"] == {}


def test_the_convert_example_uses_the_action_as_documented():
    example = _load(CONVERT_EXAMPLE)
    inputs = _load(ROOT / "action.yml")["inputs"]
    (job,) = example["jobs"].values()
    assert example["permissions"] == {} and job["permissions"] == {"contents": "read"}
    ours = [s for s in job["steps"] if OURS.match(str(s.get("uses", "")))]
    assert len(ours) == 1
    assert set(ours[0]["with"]) <= set(inputs)
    assert {name for name, spec in inputs.items() if spec.get("required")} <= set(ours[0]["with"])
    for step in job["steps"]:
        uses = step.get("uses")
        if uses and step is not ours[0]:
            assert SHA_PIN.match(uses), f"{uses} is not pinned to a commit"
        assert step.get("run") is None or "${{" not in step["run"]
    checkout = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False
