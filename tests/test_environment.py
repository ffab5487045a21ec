"""The one table of CECAI_* variables (cecai_converter.environment): complete, and read only through it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cecai_converter import environment
from cecai_converter.option_table import OPTIONS
from cecai_converter.request import REQUEST_ENV

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bCECAI_[A-Z0-9][A-Z0-9_]*")
#: Names in the repository that are no variable of ours: prefixes and a name a test keeps unset on purpose.
NOT_VARIABLES = {
    "CECAI_IMAGE": "a prefix: tests/test_doctor.py clears every CECAI_IMAGE* variable",
    "CECAI_NO_SUCH_REQUEST": "tests/test_request.py: a variable that is never set",
    "CECAI_UNDOCUMENTED": "this file: a name that is not in the table, on purpose",
    "CECAI_DEBUGGING": "tests/test_generate.py: a name that is not in the table, on purpose",
}
#: The record of what changed, which names variables of earlier versions, and the generated table itself.
SKIPPED = {"CHANGELOG.md", "docs/environment.md"}


def _repository_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    return [ROOT / name for name in listed if name not in SKIPPED and (ROOT / name).is_file()]


def test_every_cecai_variable_in_the_repository_has_its_row() -> None:
    options = {spec.env for spec in OPTIONS}
    missing: dict[str, str] = {}
    for path in _repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file (a GGUF fixture, an image)
        for match in NAME.finditer(text):
            name = match.group().rstrip("_")
            if name not in options and name not in environment.VARIABLES and name not in NOT_VARIABLES:
                missing.setdefault(name, str(path.relative_to(ROOT)))
    assert not missing, f"add a row to cecai_converter.environment.VARIABLES for each: {missing}"


def test_every_row_names_a_variable_something_uses() -> None:
    texts = [
        p.read_text(encoding="utf-8", errors="replace")
        for p in _repository_files()
        if p.name != "environment.py" and p.suffix != ".pyc"
    ]
    # used by its name, or through its constant (environment.IN_CONTAINER)
    constants = {
        v: f"environment.{attr}" for attr, v in vars(environment).items() if attr.isupper() and isinstance(v, str)
    }
    unused = [
        name
        for name in environment.VARIABLES
        if not any(name in text or (name in constants and constants[name] in text) for text in texts)
    ]
    assert not unused, f"rows for variables nothing reads or sets: {unused}"


def test_no_option_variable_has_a_row_of_its_own() -> None:
    assert not {spec.env for spec in OPTIONS} - {environment.THREADS} & set(environment.VARIABLES)
    assert REQUEST_ENV == environment.REQUEST


def test_rows_are_complete() -> None:
    for name, var in environment.VARIABLES.items():
        assert var.name == name and name.startswith("CECAI_"), name
        assert var.meaning and var.readers and var.default, name
        assert var.audience in environment.AUDIENCES, name


def test_the_package_reads_variables_through_the_table() -> None:
    """No module of the package outside the table reads a CECAI_ variable by its literal name through os.environ."""
    allowed_for_now: set[str] = set()
    reads = re.compile(r"""(?:environ|env)(?:\.get\(|\[)\s*["']CECAI_""")
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "src" / "cecai_converter").rglob("*.py"))
        if path.name not in allowed_for_now and reads.search(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, offenders


def test_text_and_is_set_read_the_given_environment() -> None:
    env = {"CECAI_DEBUG": "", "CECAI_LOCK_TIMEOUT": "5"}
    assert environment.text(environment.LOCK_TIMEOUT, env) == "5"
    assert environment.text(environment.DEBUG, env) == "" and not environment.is_set(environment.DEBUG, env)
    assert environment.text(environment.CORES, env) is None and environment.text(environment.CORES, env, "4") == "4"
    assert environment.is_set(environment.DEBUG, {"CECAI_DEBUG": "0"})  # any non-empty value, as before


def test_text_refuses_a_name_not_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CECAI_UNDOCUMENTED", "1")
    with pytest.raises(KeyError, match=r"CECAI_UNDOCUMENTED is not in cecai_converter\.environment\.VARIABLES"):
        environment.text("CECAI_UNDOCUMENTED")
