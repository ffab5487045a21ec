"""The files generated from the package's tables (cecai_converter.generate): current, and regenerated when stale.

The composite actions' option inputs and variables come from option_table.OPTIONS, the root action is the convert
action seen from the repository root, the shared inputs are the same in every action, and docs/options.md,
docs/precisions.md and docs/environment.md hold their tables as the tables give them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cecai_converter import generate
from cecai_converter.environment import VARIABLES
from cecai_converter.option_table import OPTIONS
from cecai_converter.pairs import DEFAULT_PAIR, PAIRS
from cecai_converter.precisions import DEFAULT_PRECISIONS, PRECISIONS, parse_precisions

ROOT = Path(__file__).resolve().parents[1]


def _copy_generated(root: Path) -> None:
    """The generated files (and what they are made from) copied under ``root``."""
    for path in generate.generated_files(ROOT):
        target = root / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def test_generated_files_are_up_to_date() -> None:
    stale = [str(p.relative_to(ROOT)) for p in generate.check(ROOT)]
    assert not stale, f"stale: {stale}; run python -m cecai_converter.generate --write"


def test_check_notices_stale_files_and_write_regenerates_them(tmp_path: Path) -> None:
    _copy_generated(tmp_path)
    assert generate.check(tmp_path) == []
    convert = tmp_path / generate.CONVERT_ACTION
    root_action = tmp_path / generate.ROOT_ACTION
    plan = tmp_path / "actions" / "plan" / "action.yml"
    precisions_doc = tmp_path / "docs" / "precisions.md"
    environment_doc = tmp_path / "docs" / "environment.md"
    # An option's variable dropped from the convert step, a shared input edited in one action, a table row changed.
    convert.write_text(convert.read_text().replace("        INPUT_KEEP_BASE: ${{ inputs.keep-base }}\n", ""))
    plan.write_text(plan.read_text().replace("default: python3", "default: python3.12"))
    precisions_doc.write_text(precisions_doc.read_text().replace("| Q8_0 | 8.50 |", "| Q8_0 | 8.00 |"))
    environment_doc.write_text(environment_doc.read_text().replace("`CECAI_DEBUG`", "`CECAI_DEBUGGING`"))
    # A hand edit of the root action (made from the convert action, its blocks regenerated first).
    root_action.write_text(root_action.read_text().replace("actions/install.sh", "../install.sh", 1))
    stale = generate.check(tmp_path)
    assert set(stale) == {convert, root_action, plan, precisions_doc, environment_doc}
    assert set(generate.write(tmp_path)) == set(stale) and generate.check(tmp_path) == []
    for path in stale:
        assert path.read_text() == (ROOT / path.relative_to(tmp_path)).read_text(), path


def test_a_file_without_its_markers_is_refused_by_name(tmp_path: Path) -> None:
    _copy_generated(tmp_path)
    doc = tmp_path / "docs" / "precisions.md"
    doc.write_text(doc.read_text().replace("<!-- END precisions table -->\n", ""))
    with pytest.raises(ValueError, match=r"docs/precisions\.md: no '<!-- BEGIN precisions table"):
        generate.check(tmp_path)


def test_the_root_action_is_the_convert_action_from_the_repository_root() -> None:
    convert_text = (ROOT / generate.CONVERT_ACTION).read_text()
    root_text = (ROOT / generate.ROOT_ACTION).read_text()
    assert generate.root_action(convert_text) == root_text
    convert, root = yaml.safe_load(convert_text), yaml.safe_load(root_text)
    assert (root["name"], convert["name"]) == ("cecai-converter", "cecai-converter convert")
    for key in ("description", "inputs", "outputs"):
        assert root[key] == convert[key], key
    for mine, theirs in zip(root["runs"]["steps"], convert["runs"]["steps"], strict=True):
        run = theirs.get("run")
        if run is not None:  # only the paths differ: actions/<script> and the root, from the root
            run = run.replace('"$GITHUB_ACTION_PATH/../.."', '"$GITHUB_ACTION_PATH"')
            run = run.replace("$GITHUB_ACTION_PATH/../", "$GITHUB_ACTION_PATH/actions/")
        assert mine == {**theirs, **({"run": run} if run is not None else {})}, theirs.get("name")
    assert "../" not in root_text and '"$GITHUB_ACTION_PATH/actions/install.sh"' in root_text


@pytest.mark.parametrize("path", ["action.yml", "actions/convert/action.yml"])
def test_each_option_input_reads_as_the_option_help_word_for_word(path: str) -> None:
    action = yaml.safe_load((ROOT / path).read_text())
    for spec in OPTIONS:
        entry = action["inputs"][spec.action_input]
        # Folded YAML joins the wrapped lines with one space: the description is the help, byte for byte.
        assert entry == {"description": spec.help, "required": False, "default": ""}, spec.name
    (step,) = [s for s in action["runs"]["steps"] if s.get("id") == "convert"]
    assert {
        k: v for k, v in step["env"].items() if k.startswith("INPUT_") and k[6:].lower() in {s.name for s in OPTIONS}
    } == {spec.action_env: f"${{{{ inputs.{spec.action_input} }}}}" for spec in OPTIONS}


def test_every_action_shares_the_install_and_python_inputs() -> None:
    shared = yaml.safe_load(generate.shared_inputs())
    assert set(shared) == {"install", "python"}
    paths = [ROOT / "action.yml", *sorted((ROOT / "actions").glob("*/action.yml"))]
    assert len(paths) == 5
    for path in paths:
        inputs = yaml.safe_load(path.read_text())["inputs"]
        assert {name: inputs[name] for name in shared} == shared, path


def test_the_precisions_table_holds_every_precision_once() -> None:
    text = (ROOT / "docs" / "precisions.md").read_text()
    begin, end = text.index("<!-- BEGIN precisions table"), text.index("<!-- END precisions table -->")
    rows = [line.split("|")[1:-1] for line in text[begin:end].splitlines()[3:]]
    cells = [row[0:3] for row in rows] + [row[4:7] for row in rows]  # the left half, then the right one
    found = {name.strip(): (bpw.strip(), need.strip()) for name, bpw, need in cells if name.strip()}
    assert list(found) == [*(n for n in PRECISIONS if n in found)] and set(found) == set(PRECISIONS)
    for name, (bpw, need) in found.items():
        info = PRECISIONS[name]
        assert float(bpw.rstrip("*")) == info.bpw and bpw.endswith("*") == (not info.bpw_measured), name
        assert (need == "required") == info.needs_imatrix, name


def test_the_environment_tables_list_every_variable() -> None:
    text = (ROOT / "docs" / "environment.md").read_text()
    for name, var in VARIABLES.items():
        assert f"| `{name}` | {var.meaning.replace('|', chr(92) + '|')} |" in text, name


def test_the_defaults_are_entries_of_their_tables() -> None:
    assert DEFAULT_PAIR in PAIRS
    assert [p.name for p in parse_precisions(list(DEFAULT_PRECISIONS))] == list(DEFAULT_PRECISIONS)


def test_module_cli_checks_the_checkout() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cecai_converter.generate", "--check"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
