"""What the release workflow (.github/workflows/release.yml) decides, in Python so that it is tested.

    python scripts/lib/release.py check-version [--tag vX.Y.Z] [--github-output FILE]
    python scripts/lib/release.py notes VERSION [--changelog FILE]

``check-version``: every place that names the project's version must name the same one: pyproject.toml, the
package's ``__version__``, the image build files (docker-bake.hcl's ``VERSION``, images/Dockerfile's
``ARG VERSION``), the default image the actions and the docker backend pull for each pair, every
``cecai-converter:<version>-<slug>`` tag written in the docs, actions, workflows and sources, CHANGELOG.md's section
for the version, and the release tag (``v<version>``). It prints one line per place and exits 1 when one disagrees;
``--github-output`` appends ``version``, ``tag`` and ``major`` (the moving ``vX`` tag) for the later jobs.

``notes``: prints CHANGELOG.md's section for VERSION (the release's notes); exit 1 when there is none.

Exit 2: bad usage (a tag that is not ``vX.Y.Z``). Standard library only, plus the package from ``src/`` for the
actions' default image (its base dependencies must be importable). Python >= 3.10.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TAG = re.compile(r"^v(?P<version>(?P<major>0|[1-9]\d*)\.(?:0|[1-9]\d*)\.(?:0|[1-9]\d*))$")
#: An image reference of this project: ``cecai-converter:<version>-<slug>``.
IMAGE_REF = re.compile(r"cecai-converter:(?P<version>\d+\.\d+\.\d+[0-9A-Za-z.+]*)-[a-z][a-z0-9-]*")
#: Where image references are looked for (globs relative to the repository root). CHANGELOG.md is history: left out.
IMAGE_REF_FILES = (
    "README.md",
    "docs/*.md",
    "action.yml",
    "actions/*/action.yml",
    ".github/workflows/*.yml",
    "examples/**/*",
    "images/*",
    "src/cecai_converter/**/*.py",
    "benchmarks/*.py",
    "scripts/*.sh",
)
_HEADING = re.compile(r"^##\s+(?P<title>[^#].*?)\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


class ReleaseError(Exception):
    """A check that failed: the message says what, the hint what to do."""

    def __init__(self, message: str, hint: str = "", exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


@dataclass(frozen=True)
class Place:
    """One place that names a version: where (file, and what in it), and the version it names (None: none found)."""

    where: str
    what: str
    version: str | None


# --------------------------------------------------------------------------------------------- the versions


def _read(root: Path, rel: str) -> str:
    path = root / rel
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReleaseError(
            f"cannot read {rel}: {exc.strerror or exc}", "run this from a checkout of the project"
        ) from None


def _first(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1) if match else None


def pyproject_version(root: Path = ROOT) -> str:
    """``[project] version`` of pyproject.toml (the version pip installs)."""
    text = _read(root, "pyproject.toml")
    project = re.search(r"^\[project\]\s*$(?P<body>.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    version = _first(r'^version\s*=\s*"([^"]+)"', project.group("body")) if project else None
    if version is None:
        raise ReleaseError("pyproject.toml has no [project] version", 'add `version = "X.Y.Z"` under [project]')
    return version


def default_images(root: Path = ROOT) -> dict[str, str]:
    """Pair → the image the actions and the docker backend pull when none is given (no CECAI_IMAGE_* set).

    Imported from the checkout's ``src/`` so that this is the code's own answer, not a copy of its rule.
    """
    src = str(root / "src")
    sys.path.insert(0, src)
    try:
        from cecai_converter.backends.container_spec import default_image
        from cecai_converter.pairs import PAIRS
    except ImportError as exc:
        raise ReleaseError(
            f"cannot import the package from {src} to read its default images ({exc})",
            "install the package's base dependencies first (pip install .)",
        ) from None
    finally:
        sys.path.remove(src)
    return {name: default_image(pair, environ={}) for name, pair in PAIRS.items()}


def _image_ref_files(root: Path) -> Iterator[Path]:
    seen: set[Path] = set()
    for pattern in IMAGE_REF_FILES:
        for path in sorted(root.glob(pattern)):
            if path.is_file() and path not in seen:
                seen.add(path)
                yield path


def places(root: Path = ROOT) -> list[Place]:
    """Every place that names the project's version, with the version it names."""
    found = [
        Place("pyproject.toml", "[project] version", pyproject_version(root)),
        Place(
            "src/cecai_converter/__init__.py",
            "__version__",
            _first(r'^__version__\s*=\s*"([^"]+)"', _read(root, "src/cecai_converter/__init__.py")),
        ),
        Place(
            "docker-bake.hcl",
            'variable "VERSION" default (the images\' tags)',
            _first(r'^variable\s+"VERSION"\s*\{\s*\n\s*default\s*=\s*"([^"]+)"', _read(root, "docker-bake.hcl")),
        ),
        Place("images/Dockerfile", "ARG VERSION", _first(r"^ARG\s+VERSION=(\S+)", _read(root, "images/Dockerfile"))),
    ]
    for pair, image in default_images(root).items():
        found.append(Place("the actions' default image", f"{pair}: {image}", _first(r":(\d+\.\d+\.\d+[^-]*)-", image)))
    for path in _image_ref_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in IMAGE_REF.finditer(line):
                rel = path.relative_to(root).as_posix()
                found.append(Place(f"{rel}:{number}", match.group(0), match.group("version")))
    return found


def parse_tag(tag: str) -> tuple[str, str]:
    """``vX.Y.Z`` → (``X.Y.Z``, the major tag ``vX``).

    Raises:
        ReleaseError: (exit 2) the tag is not ``vX.Y.Z``.
    """
    match = TAG.match(tag)
    if match is None:
        raise ReleaseError(
            f"release tag {tag!r} is not vX.Y.Z",
            "tag the release commit `vMAJOR.MINOR.PATCH` (e.g. v1.2.0); pre-releases are not published by this "
            "workflow",
            exit_code=2,
        )
    return match.group("version"), f"v{match.group('major')}"


def check_version(root: Path = ROOT, tag: str | None = None) -> tuple[str, list[tuple[Place, bool]]]:
    """The version (pyproject's) and every place with whether it agrees.

    Raises:
        ReleaseError: (exit 2) ``tag`` is not ``vX.Y.Z``; (exit 1) a file cannot be read.
    """
    version = pyproject_version(root)
    rows = [(place, place.version == version) for place in places(root)]
    if tag is not None:
        tag_version, _ = parse_tag(tag)
        rows.append((Place("the release tag", tag, tag_version), tag_version == version))
    try:
        changelog_section(_read(root, "CHANGELOG.md"), version)
        rows.append((Place("CHANGELOG.md", f"a section headed {version}", version), True))
    except ReleaseError as exc:
        rows.append((Place("CHANGELOG.md", f"{exc.message}: {exc.hint}", None), False))
    return version, rows


# --------------------------------------------------------------------------------------------- the changelog


def _sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """(heading title, body lines) for each ``## `` section; headings inside code fences do not count."""
    title: str | None = None
    body: list[str] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading:
            if title is not None:
                yield title, body
            title, body = heading.group("title"), []
        elif title is not None:
            body.append(line)
    if title is not None:
        yield title, body


def _names_version(title: str, version: str) -> bool:
    """A heading names the version when it starts with it: ``[1.2.0] — 2026-01-02``, ``1.2.0``, ``v1.2.0 …``."""
    first = title.split()[0] if title.split() else ""
    return first.strip("[]").removeprefix("v") == version


def changelog_section(text: str, version: str) -> str:
    """The body of the CHANGELOG section headed with ``version`` (``## [X.Y.Z] — date``), trimmed.

    Raises:
        ReleaseError: no such section, or it is empty; a section still headed Unreleased is named in the hint.
    """
    titles: list[str] = []
    for title, body in _sections(text):
        titles.append(title)
        if _names_version(title, version):
            notes = "\n".join(body).strip("\n")
            if not notes.strip():
                raise ReleaseError(f"CHANGELOG.md's section {title!r} is empty", "list the release's changes in it")
            return notes + "\n"
    unreleased = [t for t in titles if t.lower().lstrip("[").startswith("unreleased")]
    hint = f'head the release\'s section "## [{version}] — YYYY-MM-DD"'
    if unreleased:
        hint += f' (rename "## {unreleased[0]}")'
    raise ReleaseError(f"CHANGELOG.md has no section headed {version}", hint)


# --------------------------------------------------------------------------------------------- the command line


def _table(rows: Iterable[tuple[Place, bool]]) -> list[str]:
    rows = list(rows)
    width = max((len(place.where) for place, _ in rows), default=0)
    return [
        f"  {'ok' if good else 'DIFFERS':7}  {place.where:{width}}  {place.version or '(none)':10}  {place.what}"
        for place, good in rows
    ]


def _check_version(args: argparse.Namespace) -> int:
    version, rows = check_version(args.root, args.tag)
    print(f"version {version} (pyproject.toml), as named by each place:")
    print("\n".join(_table(rows)))
    bad = [place for place, good in rows if not good]
    if bad:
        raise ReleaseError(
            f"{len(bad)} place(s) disagree with pyproject.toml's version {version}: "
            + ", ".join(place.where for place in bad),
            "set the same version everywhere (pyproject.toml, src/cecai_converter/__init__.py, then "
            "`python -m cecai_converter.images --write` for the bake file and docs/images.md), head its CHANGELOG "
            "section, and tag v<version>",
        )
    if args.github_output:
        major = parse_tag(args.tag)[1] if args.tag else f"v{version.split('.')[0]}"
        with Path(args.github_output).open("a", encoding="utf-8") as out:
            out.write(f"version={version}\ntag=v{version}\nmajor={major}\n")
    return 0


def _notes(args: argparse.Namespace) -> int:
    sys.stdout.write(changelog_section(_read(args.root, args.changelog), args.version))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line in the module's docstring."""
    parser = argparse.ArgumentParser(prog="release.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout (default: this script's)")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-version", help="every place names pyproject's version (and the tag's)")
    check.add_argument("--tag", help="the release tag, vX.Y.Z")
    check.add_argument("--github-output", help="append version, tag and major to this file ($GITHUB_OUTPUT)")
    check.set_defaults(handler=_check_version)
    notes = sub.add_parser("notes", help="CHANGELOG.md's section for VERSION")
    notes.add_argument("version")
    notes.add_argument("--changelog", default="CHANGELOG.md", help="relative to --root")
    notes.set_defaults(handler=_notes)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ReleaseError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
