"""docs/ARCHITECTURE.md stays true to the code: every module has an entry, every entry a module, and the manifest
sketch has the keys the pipeline writes. docs/actions.md has a row for every input and output of every action.

Module entries are the lines of the fenced block that starts with ``src/cecai_converter/``, indented by two spaces:
``  name.py      description`` (several names separated by ", "); description lines that continue an entry are
indented further.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGE = ROOT / "src" / "cecai_converter"

_BLOCK = re.compile(r"^```\n(src/cecai_converter/\n.*?)^```", re.MULTILINE | re.DOTALL)
_ENTRY = re.compile(r"^  ([\w/]+\.py(?:, [\w/]+\.py)*)(?:\s|$)")
_MANIFEST_SKETCH = re.compile(r"manifest\.json` \(schema \d.*?```json\n(.*?)```", re.DOTALL)


def module_entries(doc: str) -> tuple[set[str], list[str]]:
    """The module paths the doc's module list names, and the entry lines it could not read."""
    block = _BLOCK.search(doc)
    if block is None:
        return set(), ["no fenced block starting with 'src/cecai_converter/'"]
    names: set[str] = set()
    unreadable = []
    for line in block.group(1).splitlines()[1:]:
        if not line.startswith("  ") or line.startswith("   "):
            continue  # a continuation line (or blank)
        match = _ENTRY.match(line)
        if match is None:
            unreadable.append(line)
        else:
            names.update(match.group(1).split(", "))
    return names, unreadable


def doc_problems(doc: str, package: Path) -> list[str]:
    """What is wrong between the module list in ``doc`` and the module files under ``package``."""
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    named, unreadable = module_entries(doc)
    problems = [f"unreadable entry (expected '  name.py  description'): {line!r}" for line in unreadable]
    problems += [f"{m}: no entry in docs/ARCHITECTURE.md" for m in sorted(modules - named)]
    problems += [f"{m}: named in docs/ARCHITECTURE.md but there is no such module" for m in sorted(named - modules)]
    return problems


def test_every_module_has_an_entry_and_every_entry_a_module() -> None:
    problems = doc_problems(DOC.read_text(encoding="utf-8"), PACKAGE)
    assert not problems, "\n".join(problems)


def test_a_missing_or_invented_module_is_reported(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("__init__.py", "a.py", "b.py", "sub/c.py", "new.py"):
        (tmp_path / name).write_text("")
    doc = (
        "# x\n\n```\nsrc/cecai_converter/\n"
        "  __init__.py  the version\n"
        "  a.py, b.py   two modules\n"
        "               that continue here\n"
        "  sub/c.py     nested\n"
        "  ghost.py     gone\n"
        "  - not an entry\n"
        "```\n"
    )
    assert doc_problems(doc, tmp_path) == [
        "unreadable entry (expected '  name.py  description'): '  - not an entry'",
        "new.py: no entry in docs/ARCHITECTURE.md",
        "ghost.py: named in docs/ARCHITECTURE.md but there is no such module",
    ]
    assert doc_problems("no list here", tmp_path)[0].startswith("unreadable entry")


def _literal_keys(path: Path, required: set[str]) -> set[str]:
    """The string keys of every dict display in ``path`` whose keys include all of ``required``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if required <= keys:
                found |= keys
    assert found, f"{path.name}: no dict with keys {sorted(required)} (the test needs updating with the code)"
    return found


def _tuple_constant(path: Path, name: str) -> set[str]:
    """The strings of the module-level tuple ``name`` in ``path``."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign):
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == name and value is not None:
            return set(ast.literal_eval(value))
    raise AssertionError(f"{path.name} defines no {name}")


def test_the_manifest_sketch_has_the_keys_the_code_writes() -> None:
    sketch = _MANIFEST_SKETCH.search(DOC.read_text(encoding="utf-8"))
    assert sketch is not None, "docs/ARCHITECTURE.md has no ```json sketch of manifest.json"
    doc_keys = set(re.findall(r'"(\w+)":', sketch.group(1)))
    doc_top = set(re.findall(r'^  [ {]"(\w+)":', sketch.group(1), re.MULTILINE))
    top = _literal_keys(PACKAGE / "pipeline" / "deliver.py", {"model_name", "files", "toolchain"})
    top |= _literal_keys(PACKAGE / "manifest.py", {"schema", "tool"})
    written = top | _literal_keys(PACKAGE / "pipeline" / "deliver.py", {"sha256", "verification", "precision"})
    written |= _tuple_constant(PACKAGE / "pipeline" / "job.py", "FACT_KEYS")
    written |= _literal_keys(PACKAGE / "verify.py", {"generated_tokens", "runtime"}) - {"path"}
    written |= _tuple_constant(PACKAGE / "fidelity" / "measurement.py", "RESULT_KEYS")
    assert not written - doc_keys, f"keys the code writes that the sketch lacks: {sorted(written - doc_keys)}"
    assert not doc_top - top, f"top-level keys in the sketch the code does not write: {sorted(doc_top - top)}"


def test_every_action_input_and_output_is_in_docs_actions() -> None:
    yaml = pytest.importorskip("yaml")
    doc = (ROOT / "docs" / "actions.md").read_text(encoding="utf-8")
    first_cells = re.findall(r"^\| ([^|]+) \|", doc, re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`([\w-]+)`", cell)}
    missing = []
    for path in [ROOT / "action.yml", *sorted((ROOT / "actions").glob("*/action.yml"))]:
        action = yaml.safe_load(path.read_text(encoding="utf-8"))
        for kind in ("inputs", "outputs"):
            names = [name for name in action.get(kind) or {} if name not in documented]
            missing += [f"{path.relative_to(ROOT)}: {kind[:-1]} {name}" for name in names]
    assert not missing, "not in a table of docs/actions.md:\n" + "\n".join(missing)


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of ``markdown`` (lower case, punctuation dropped, spaces as dashes)."""
    anchors = set()
    fenced = False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (match := re.match(r"^#{1,6} (.+)$", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_links_between_the_docs_lead_somewhere() -> None:
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # a URL, not a file of this repository
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_relative_to(ROOT):
                broken.append(f"{page.relative_to(ROOT)}: {target} (leaves the repository)")
            elif not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


#: A relative path written in prose that climbs out of its folder: ``(../shared/notes.md)``, ``see ../x/y.md``.
_CLIMBING_PATH = re.compile(r"(?<![\w/.`])(\.\./[\w.-]+(?:/[\w.-]+)*)")


def _prose(markdown: str) -> str:
    """The page without code fences and code spans (a hostile ``../../x`` shown as an example is not a reference)."""
    kept, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and not line.startswith("```"):
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def test_no_doc_refers_to_a_file_outside_the_repository() -> None:
    """A reader of a clone has only the repository: a link or a path in prose that leads out of it is broken for
    them (docs/check.md once cited ../shared/field-notes.md, a file of the machine the project was built on)."""
    outside = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        outside += [f"{page.relative_to(ROOT)}: {ref}" for ref in _refs_leading_out(page)]
    assert not outside, "\n".join(outside)


def _refs_leading_out(page: Path, text: str | None = None) -> list[str]:
    """The climbing paths of ``page`` that lead out of the repository or to no file in it."""
    refs = _CLIMBING_PATH.findall(_prose(page.read_text(encoding="utf-8") if text is None else text))
    return [r for r in refs if not (dest := (page.parent / r).resolve()).is_relative_to(ROOT) or not dest.exists()]


def test_the_outside_reference_check_finds_them() -> None:
    text = (
        "Measured there (../shared/field-notes.md); see [the notes](../../notes.md); `../../x` is an example; "
        "[images](../docs/images.md) is here."
    )
    assert _refs_leading_out(ROOT / "docs" / "check.md", text) == ["../shared/field-notes.md", "../../notes.md"]
