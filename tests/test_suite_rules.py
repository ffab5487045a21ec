"""Rules the test suite keeps about itself: what `slow` marks, and which missing parts fail instead of skipping.

The `slow` marker says what its description says (pyproject.toml, docs/development.md): a test that runs a real
conversion or builds a tool, itself or through a fixture, is marked slow; `-m "not slow"` is then the quick run.

This test holds the fixture half of that rule, read statically from the test files (no test is run). A fixture
*builds* when its body, a module-level helper it calls or a fixture it takes runs one of :data:`BUILDING_CALLS`, the
CLI (``cli``, ``run_cli``, ``main``…) with one of :data:`BUILDING_COMMANDS`, the convert action (the root
action.yml), a cecai-convert process with such a command, or an image build script. A fixture that only hands out a
function (``llama_programs``, test_hub's ``convert``) builds nothing itself; a fixture that calls such a function
does. Every test that takes a building fixture, directly or through another one, must be marked slow by a
decorator, its class or the module's ``pytestmark``. Tests that convert without a fixture (the CLI called in the
test itself) are marked by hand, by the same rule.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ALL_PARTS, PARTS, ROOT, required_parts

TESTS = Path(__file__).resolve().parent
#: Calls that convert, quantize or build llama.cpp's tools, whatever the arguments.
BUILDING_CALLS = frozenset(
    {"run_job", "run_jobs", "run_converter", "convert_to_f32", "quantize", "llama_model_quantize", "build_tools"}
)
#: CLI commands that convert (`check`, `verify`, `audit` load a model but make none).
BUILDING_COMMANDS = frozenset({"convert", "run", "demo", "reproduce"})
#: The names tests run the CLI through: conftest's ``cli``/``run_cli``, a module's ``_cli``, ``cli.main``, ``gha.main``.
CLI_CALLERS = frozenset({"cli", "run_cli", "_cli", "main"})
#: Scripts that build an image (and llama.cpp in it).
BUILD_SCRIPTS = ("build-cpu-image.sh", "build-image.sh")


@dataclass
class Module:
    """One test file (or conftest.py): its module-level functions, fixtures and slow marks."""

    name: str
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    fixtures: dict[str, ast.FunctionDef] = field(default_factory=dict)
    autouse: list[str] = field(default_factory=list)
    imported: dict[str, str] = field(default_factory=dict)  # name → the test module it comes from
    slow_module: bool = False
    slow_class: set[str] = field(default_factory=set)  # test names inside a class marked slow
    tests: dict[str, ast.FunctionDef] = field(default_factory=dict)


def _decorated_slow(node: ast.FunctionDef | ast.ClassDef) -> bool:
    return any("mark.slow" in ast.unparse(d) for d in node.decorator_list)


def _fixture_decorator(node: ast.FunctionDef) -> ast.expr | None:
    return next((d for d in node.decorator_list if "fixture" in ast.unparse(d)), None)


def _literals(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def read_module(path: Path) -> Module:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = Module(path.stem)
    # imports at the top, and at the top of a function's (or a method's) body: where the tests import helpers
    bodies = [tree.body]
    for node in tree.body:
        inner = node.body if isinstance(node, ast.ClassDef) else [node]
        bodies += [func.body for func in inner if isinstance(func, ast.FunctionDef)]
    for body in bodies:
        for node in body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("test_", "conftest")):
                module.imported.update({alias.asname or alias.name: node.module for alias in node.names})
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            module.slow_module = "mark.slow" in ast.unparse(node.value)
        members = [(node, False)] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef):
            members = [(sub, _decorated_slow(node)) for sub in node.body if isinstance(sub, ast.FunctionDef)]
        for func, class_slow in members:
            decorator = _fixture_decorator(func)
            if decorator is not None:
                keywords = {kw.arg: kw.value for kw in getattr(decorator, "keywords", [])}
                name = keywords["name"].value if isinstance(keywords.get("name"), ast.Constant) else func.name
                module.fixtures[str(name)] = func
                if isinstance(keywords.get("autouse"), ast.Constant) and keywords["autouse"].value is True:
                    module.autouse.append(str(name))
            elif func.name.startswith("test_"):
                module.tests[func.name] = func
                if class_slow:
                    module.slow_class.add(func.name)
            else:
                module.functions[func.name] = func
    return module


def _own_nodes(func: ast.FunctionDef) -> Iterator[ast.AST]:
    """The nodes of ``func``'s body, not those of the functions defined inside it (a factory's body runs later)."""
    stack: list[ast.AST] = list(func.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _builds_directly(call: ast.Call, lists: dict[str, set[str]]) -> str | None:
    """Why ``call`` converts or builds, or None; ``lists``: the literals assigned to each local name (``*args``)."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    args: set[str] = set()
    for arg in call.args:
        starred = isinstance(arg, ast.Starred) and isinstance(arg.value, ast.Name)
        args |= lists.get(arg.value.id, set()) if starred else _literals(arg)  # type: ignore[attr-defined]
    if name in BUILDING_CALLS:
        return name
    if name in CLI_CALLERS and args & BUILDING_COMMANDS:
        return f"{name}({', '.join(sorted(args & BUILDING_COMMANDS))})"
    if args & {"cecai_converter", "cecai-convert"} and args & BUILDING_COMMANDS:
        return f"cecai-convert {', '.join(sorted(args & BUILDING_COMMANDS))}"
    if name == "run_composite" and call.args:
        action = ast.unparse(call.args[0])
        if "convert" in action or ("action.yml" in action and "actions" not in action):
            return "the convert action"
    if any(s.endswith(BUILD_SCRIPTS) for s in args):
        return "an image build"
    return None


class Suite:
    """Every test file of tests/, and which fixtures build."""

    def __init__(self, folder: Path = TESTS) -> None:
        self.modules = {p.stem: read_module(p) for p in sorted(folder.glob("*.py"))}
        self._memo: dict[tuple[str, str], str | None] = {}

    def fixture(self, module: str, name: str) -> tuple[str, ast.FunctionDef] | None:
        """Where pytest finds fixture ``name`` for a test of ``module``: the module itself, else conftest.py."""
        for where in (module, "conftest"):
            found = self.modules[where].fixtures.get(name) if where in self.modules else None
            if found is not None:
                return where, found
        return None

    def builds(self, module: str, func: ast.FunctionDef, seen: frozenset[str] = frozenset()) -> str | None:
        """Why calling ``func`` of ``module`` (its fixtures set up first) converts or builds, or None."""
        key = (module, f"{func.name}:{func.lineno}")
        if key in self._memo:
            return self._memo[key]
        if f"{module}.{func.name}" in seen:
            return None
        seen |= {f"{module}.{func.name}"}
        reason = None
        params = {a.arg for a in func.args.args}
        lists: dict[str, set[str]] = {}
        for node in _own_nodes(func):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                lists.setdefault(node.targets[0].id, set()).update(_literals(node.value))
        for node in _own_nodes(func):
            if reason is None and isinstance(node, ast.Call):
                reason = _builds_directly(node, lists) or self._builds_through(module, node, params, seen)
        for param in sorted(params) if reason is None else ():
            found = self.fixture(module, param)
            if found is not None and (why := self.builds(found[0], found[1], seen)):
                reason = f"{param} → {why}"
                break
        self._memo[key] = reason
        return reason

    def _builds_through(self, module: str, call: ast.Call, params: set[str], seen: frozenset[str]) -> str | None:
        """A call of a module-level helper, of an imported test helper, or (in a fixture) of a factory fixture."""
        if not isinstance(call.func, ast.Name):
            return None
        name, mod = call.func.id, self.modules[module]
        target: tuple[str, ast.FunctionDef] | None = None
        if name in mod.functions:
            target = module, mod.functions[name]
        elif name in mod.imported and mod.imported[name] in self.modules:
            source = self.modules[mod.imported[name]]
            if name in source.functions:
                target = source.name, source.functions[name]
        elif name in params and (found := self.fixture(module, name)) is not None:
            # a factory fixture called by a fixture: what its inner function does is done now
            inner = [n for n in ast.walk(found[1]) if isinstance(n, ast.FunctionDef) and n is not found[1]]
            for func in inner:
                if why := self.builds(found[0], func, seen):
                    return f"{name}() → {why}"
            return None
        if target is None:
            return None
        why = self.builds(target[0], target[1], seen)
        return f"{name}() → {why}" if why else None

    def unmarked(self) -> list[str]:
        """Tests that take a building fixture and are not marked slow, each with the chain that builds."""
        found = []
        for module in self.modules.values():
            if not module.name.startswith("test_") or module.slow_module:
                continue
            for name, test in module.tests.items():
                if name in module.slow_class or _decorated_slow(test):
                    continue
                taken = [a.arg for a in test.args.args] + module.autouse
                for decorator in test.decorator_list:
                    if "usefixtures" in ast.unparse(decorator):
                        taken += sorted(_literals(decorator))
                for param in taken:
                    fixture = self.fixture(module.name, param)
                    if fixture is not None and (why := self.builds(fixture[0], fixture[1])):
                        found.append(f"tests/{module.name}.py::{name} takes {param} → {why}")
                        break
        return found


@functools.cache
def read_suite() -> Suite:
    """The test files, read once for the tests below."""
    return Suite()


def test_the_finder_sees_the_fixtures_that_build() -> None:
    suite = read_suite()
    building = [("test_check", "made"), ("test_card", "converted"), ("test_gguf_header", "gguf_file"),
                ("test_imatrix", "tools"), ("test_release_flow", "made"), ("conftest", "cpu_image")]  # fmt: skip
    for module, name in building:
        fixture = suite.fixture(module, name)
        assert fixture is not None and suite.builds(*fixture), f"{module}.{name} is not seen to build"
    for module, name in [("conftest", "tiny_llama"), ("conftest", "llama_programs"), ("test_hub", "convert")]:
        fixture = suite.fixture(module, name)
        assert fixture is not None and not suite.builds(*fixture), f"{module}.{name} is seen to build"


def test_every_test_that_takes_a_building_fixture_is_marked_slow() -> None:
    unmarked = read_suite().unmarked()
    assert not unmarked, "mark these @pytest.mark.slow (they convert or build through a fixture):\n" + "\n".join(
        unmarked
    )


# -- CECAI_REQUIRE ----------------------------------------------------------------------------------------------------
def test_cecai_require_names_parts_or_all_and_refuses_a_misspelt_one() -> None:
    assert required_parts("") == frozenset()
    assert required_parts(" llama , act,") == {"llama", "act"}
    assert required_parts("all") == ALL_PARTS == set(PARTS) - {"gpu"}
    assert required_parts("all,gpu") == set(PARTS)
    assert required_parts("", "1") == {"engine"} and required_parts("torch", "0") == {"torch"}
    with pytest.raises(pytest.UsageError, match="CECAI_REQUIRE names lama, which is not a part"):
        required_parts("all,lama")


def test_dev_test_requires_every_part_but_the_gpu() -> None:
    """./dev test names every part (what it installs, and cmake), the engine only when it started one."""
    dev = (ROOT / "dev").read_text(encoding="utf-8")
    listed = re.search(r'^\s*require="([a-z,]+)"$', dev, re.MULTILINE)
    assert listed is not None, "./dev test sets no CECAI_REQUIRE list"
    assert set(listed.group(1).split(",")) == ALL_PARTS - {"engine"}
    assert 'require="$require,engine"' in dev and 'export CECAI_REQUIRE="${CECAI_REQUIRE-$require}"' in dev
    assert dev.index('require="$require,engine"') < dev.index("export CECAI_REQUIRE=") < dev.index("python -m pytest")
