"""The package's layers hold: no module imports from a layer above its own, no import cycle, and no hidden
in-function import of the package's own modules.

The layer table is :data:`LAYERS` below; docs/ARCHITECTURE.md shows the same table between the
``<!-- layers:begin -->`` and ``<!-- layers:end -->`` markers, and :func:`test_the_doc_shows_this_table` holds the two
together. A name covers a module, or a subpackage and every module in it unless one of them is named itself.

An import of the package's own modules inside a function is allowed only with a ``# lazy: <why>`` comment on its line
or the line above, naming the optional or slow dependency it keeps off the import path. An import in a module's
``if __name__ == "__main__":`` block runs only when the module is a program (``python -m``), under the name
``__main__``, so it counts for the layers but closes no cycle.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cecai_converter"
DOC = ROOT / "docs" / "ARCHITECTURE.md"

#: The layers, lowest first: a module may import from its own layer and the ones listed before it.
LAYER_NAMES: tuple[str, ...] = (
    "ground",
    "records",
    "processes",
    "steps",
    "pipeline",
    "options",
    "backends",
    "commands",
)

#: Every module (dotted, under cecai_converter; "" is the package itself) → its layer. A subpackage's name covers
#: its modules.
LAYERS: dict[str, str] = {
    # ground tables: constants, errors, names, plain file and text helpers (stdlib and each other only)
    "": "ground",
    "environment": "ground",
    "errors": "ground",
    "output": "ground",
    "fsutil": "ground",
    "names": "ground",
    "markdown": "ground",
    "untrusted_json": "ground",
    "precisions": "ground",
    "pairs": "ground",
    "texts": "ground",
    "gguf_header": "ground",
    "request_options": "ground",
    # records: what a run writes down and reads back, typed and validated
    "records": "records",
    "manifest": "records",
    "manifest_fields": "records",
    "quant_types": "records",
    "parity_record": "records",
    "parity_limits": "records",
    # processes: child processes, workers, threads, the installed runtime and the pinned toolchain
    "processes": "processes",
    "threads": "processes",
    "runtime": "processes",
    "toolchain": "processes",
    "llama_programs": "processes",
    "runtime_build": "processes",
    # steps: one thing done to a model or a GGUF
    "source": "steps",
    "source_card": "steps",
    "convert": "steps",
    "quantize": "steps",
    "imatrix": "steps",
    "llama_vocab": "steps",
    "verify": "steps",
    "multimodal": "steps",
    "agreement": "steps",
    "fidelity": "steps",
    "source_parity": "steps",
    "signing": "steps",
    "card": "steps",
    "modelgen": "steps",
    # pipeline: the steps in order, one job at a time
    "pipeline": "pipeline",
    "reproduce": "pipeline",
    # options: the request (every option, its sources) and the Converter folder contract
    "option_table": "options",
    "option_flags": "options",
    "request": "options",
    "config": "options",
    # backends: where a job runs (containers)
    "backends": "backends",
    # commands: the CLI, the actions' entry, releases, reports, generators
    "__main__": "commands",
    "cli": "commands",
    "commands": "commands",
    "card_commands": "commands",
    "signing_commands": "commands",
    "check": "commands",
    "batch": "commands",
    "plan": "commands",
    "audit": "commands",
    "report": "commands",
    "job_summary": "commands",
    "gha": "commands",
    "release": "commands",
    "doctor": "commands",
    "images": "commands",
    "generate": "commands",
}

_LAZY = re.compile(r"#\s*lazy:\s*\S")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``src/cecai_converter/a/b.py`` → ``a.b``; a package's ``__init__.py`` → the package's name."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str, table: dict[str, str] = LAYERS) -> str | None:
    """The layer of ``module``: its own entry, else its closest enclosing subpackage's."""
    name = module
    while True:
        if name in table:
            return table[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


@dataclass(frozen=True)
class Import:
    """One import of a package module: who, where, what, and how it is placed."""

    source: str
    path: Path
    line: int
    target: str
    in_function: bool
    in_main_block: bool
    commented: bool


def _is_main_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    return (
        isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The package modules ``node`` imports (dotted, under cecai_converter)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        for name in names:
            if name == "cecai_converter" or name.startswith("cecai_converter."):
                yield name.removeprefix("cecai_converter").removeprefix(".")
        return
    if node.level:
        base = module.split(".") if module else []
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        parent = ".".join(base + ([node.module] if node.module else []))
    elif node.module and (node.module == "cecai_converter" or node.module.startswith("cecai_converter.")):
        parent = node.module.removeprefix("cecai_converter").removeprefix(".")
    else:
        return
    for alias in node.names:
        child = f"{parent}.{alias.name}" if parent else alias.name
        yield child if child in known else parent


def _file_imports(module: str, path: Path, known: set[str]) -> list[Import]:
    """The package-module imports in one file, each with its placement."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found: list[Import] = []
    pending: list[tuple[ast.AST, bool, bool]] = [(ast.parse(text, filename=str(path)), False, False)]
    while pending:
        node, in_function, in_main = pending.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                above = lines[child.lineno - 2] if child.lineno >= 2 else ""
                commented = bool(_LAZY.search(lines[child.lineno - 1]) or _LAZY.search(above))
                for target in _targets(child, module, path.name == "__init__.py", known):
                    found.append(Import(module, path, child.lineno, target, in_function, in_main, commented))
            func = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            pending.append((child, in_function or func, in_main or _is_main_block(child)))
    return sorted(found, key=lambda imp: (imp.line, imp.target))


@functools.cache
def package_imports(package: Path = PACKAGE) -> list[Import]:
    """Every import of a package module by a package module: top-level, in functions, under TYPE_CHECKING."""
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py")) if "__pycache__" not in p.parts}
    found: list[Import] = []
    for module, path in files.items():
        found += _file_imports(module, path, set(files))
    return found  # cached: the tests read it several times; callers do not change it


def _where(imp: Import) -> str:
    return f"{imp.path.relative_to(ROOT) if imp.path.is_relative_to(ROOT) else imp.path}:{imp.line}"


def upward_imports(imports: list[Import], table: dict[str, str] = LAYERS) -> list[str]:
    """Each import of a module from a layer above the importer's, as ``file:line: a (layer) imports b (layer)``."""
    rank = {name: i for i, name in enumerate(LAYER_NAMES)}
    problems: list[str] = []
    for imp in imports:
        own, theirs = layer_of(imp.source, table), layer_of(imp.target, table)
        if own is None or theirs is None:
            continue  # reported by test_every_module_has_a_layer
        if rank[theirs] > rank[own]:
            problems.append(
                f"{_where(imp)}: {imp.source or 'cecai_converter'} ({own}) imports {imp.target} ({theirs}), "
                f"a higher layer"
            )
    return list(dict.fromkeys(problems))


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The import cycles among the package's modules (every import but a ``__main__`` block's), one per strongly
    connected component, as a closed path."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.in_main_block and imp.source != imp.target:
            graph.setdefault(imp.source, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                strong(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strong(node)
    return components


def hidden_imports(imports: list[Import]) -> list[str]:
    """Each in-function import of a package module without a ``# lazy: <why>`` comment."""
    problems = [
        f"{_where(imp)}: {imp.source} imports {imp.target} inside a function without a '# lazy: <why>' comment "
        f"(move it to the top, or say which optional or slow dependency it keeps off the import path)"
        for imp in imports
        if imp.in_function and not imp.commented
    ]
    return list(dict.fromkeys(problems))  # one line per import statement and module


_DOC_BLOCK = re.compile(r"<!-- layers:begin -->\n```\n(.*?)```\n<!-- layers:end -->", re.DOTALL)
_DOC_LAYER = re.compile(r"^(\w+)\s+(.*)$")


def doc_table(doc: str) -> tuple[list[str], dict[str, str]]:
    """The layer table docs/ARCHITECTURE.md shows: the layers top to bottom, and module → layer.

    The block lists the layers highest first, one per line (``name  module, module, ...``, continued on lines that
    start with a space); lines of arrows between them are skipped. ``cecai_converter`` names the package itself.
    """
    block = _DOC_BLOCK.search(doc)
    assert block is not None, (
        "docs/ARCHITECTURE.md: no layer table between <!-- layers:begin --> and <!-- layers:end -->"
    )
    order: list[str] = []
    table: dict[str, str] = {}
    for line in block.group(1).splitlines():
        if not line.strip() or set(line.strip()) <= set("↓|v "):
            continue
        match = _DOC_LAYER.match(line)
        if match:
            order.append(match.group(1))
            rest = match.group(2)
        else:
            rest = line
        for name in re.split(r"[,\s]+", rest.strip()):
            if name:
                table["" if name == "cecai_converter" else name.removesuffix("/").replace("/", ".")] = order[-1]
    return order, table


# --- the tests -----------------------------------------------------------------------------------------------------


def test_every_module_has_a_layer() -> None:
    modules = [module_name(p) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    missing = sorted(m for m in modules if layer_of(m) is None)
    assert not missing, f"modules with no layer in tests/test_layers.py LAYERS: {missing}"
    assert set(LAYERS.values()) <= set(LAYER_NAMES)
    stale = sorted(name for name in LAYERS if not any(m == name or m.startswith(name + ".") for m in modules))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_the_doc_shows_this_table() -> None:
    order, table = doc_table(DOC.read_text(encoding="utf-8"))
    assert order == list(reversed(LAYER_NAMES)), (
        f"docs/ARCHITECTURE.md's layers {order} != {list(reversed(LAYER_NAMES))}"
    )
    only_doc = {k: v for k, v in table.items() if LAYERS.get(k) != v}
    only_test = {k: v for k, v in LAYERS.items() if table.get(k) != v}
    assert not only_doc and not only_test, (
        f"docs/ARCHITECTURE.md's layer table and tests/test_layers.py LAYERS differ: doc {only_doc}, test {only_test}"
    )


def test_no_import_goes_up_a_layer() -> None:
    problems = upward_imports(package_imports())
    assert not problems, "\n".join(problems)


def test_no_import_cycle() -> None:
    cycles = import_cycles(package_imports())
    assert not cycles, "import cycles (every import counted):\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_no_hidden_in_function_import() -> None:
    problems = hidden_imports(package_imports())
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_should(tmp_path: Path) -> None:
    """A planted upward import, cycle and hidden import in a small package are each reported with file:line."""
    pkg = tmp_path / "cecai_converter"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    (pkg / "high.py").write_text("from . import low\n\n\ndef g():\n    # lazy: a slow one\n    from .low import f\n")
    (pkg / "main.py").write_text("if __name__ == '__main__':\n    from .high import g\n")
    imports = package_imports(pkg)
    table = {"": "ground", "low": "ground", "high": "commands", "main": "ground"}
    up = upward_imports(imports, table)
    assert len(up) == 2 and all("(ground) imports high (commands)" in p for p in up), up
    assert any(p.endswith("low.py:2: low (ground) imports high (commands), a higher layer") for p in up), up
    assert import_cycles(imports) == [["high", "low"]]
    hidden = hidden_imports(imports)
    assert len(hidden) == 1 and "low.py:2: low imports high inside a function" in hidden[0], hidden


def test_every_command_module_is_registered_and_in_the_commands_layer() -> None:
    """The commands convention (docs/ARCHITECTURE.md, "Commands: one convention"): a module with a top-level
    ``register`` is listed in cli._COMMAND_MODULES and sits in the commands layer, and every listed module has one."""
    from cecai_converter import cli

    package = Path(__file__).resolve().parents[1] / "src" / "cecai_converter"
    with_register = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.FunctionDef) and node.name == "register" for node in tree.body):
            parts = path.relative_to(package.parent).with_suffix("").parts
            with_register.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    listed = set(cli._COMMAND_MODULES)
    # a package listed by its name registers through its __init__ (doctor re-exports doctor.command's register)
    resolved = {name for name in listed if name in with_register} | {
        m for m in with_register for name in listed if m.startswith(name + ".") and name not in with_register
    }
    assert with_register == resolved, (sorted(with_register - resolved), sorted(listed))
    for name in with_register:
        top = name.split(".")[1]
        assert LAYERS[top] == "commands", f"{name} registers a command but is in the {LAYERS[top]} layer"
