"""The one pinned llama.cpp: converter, quantizer and runtime from the same llama-cpp-python release.

The runtime and the quantizer are the installed ``llama_cpp`` package. The converter (``convert_hf_to_gguf.py``,
its ``conversion/`` package and its own ``gguf-py``) is not installed by pip, so it is taken from the *same
version's* sdist on the package index, checked against a pinned SHA-256, extracted once into a cache and reused
offline. llama.cpp's command-line tools (``llama-imatrix``, ``llama-perplexity``…) are built from the same sdist by
:mod:`.llama_programs`, through the same :func:`extract_llama_cpp`. ``cecai-convert toolchain`` shows where everything
is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from . import environment
from .errors import ToolchainError, ToolNotFound
from .fsutil import sha256_file
from .processes import run_tool
from .runtime import installed_runtime_version

__all__ = [
    "LLAMA_CPP_PYTHON_VERSION",
    "SDIST_SHA256",
    "Toolchain",
    "cache_root",
    "ensure_converter",
    "extract_llama_cpp",
    "sdist_path",
    "toolchain_info",
]

#: The one llama.cpp release everything comes from; pyproject's `local` extra pins the same version.
LLAMA_CPP_PYTHON_VERSION: Final = "0.3.36"
#: SHA-256 of ``llama_cpp_python-<version>.tar.gz`` as published on PyPI.
SDIST_SHA256: Final = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

_SDIST_NAME: Final = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
# The llama.cpp tree inside the sdist: <top folder>/vendor/llama.cpp/…
_VENDOR_PARTS: Final = ("vendor", "llama.cpp")
# What the converter needs from the vendored tree (about 2 MB of the 77 MB sdist).
_CONVERTER_MEMBERS: Final = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_MARKER: Final = "cecai-toolchain.json"


def cache_root() -> Path:
    """Where the toolchain lives: ``$CECAI_TOOLCHAIN_DIR``, else ``$XDG_CACHE_HOME/cecai-converter/toolchain``."""
    explicit = environment.text(environment.TOOLCHAIN_DIR)
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cecai-converter" / "toolchain"


def _version_dir() -> Path:
    return cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def _check_sdist(path: Path) -> None:
    actual = sha256_file(path)
    if actual != SDIST_SHA256:
        raise ToolchainError(
            f"{path} is not the published llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
            f"(sha256 {actual[:16]}…, expected {SDIST_SHA256[:16]}…)",
            hint="delete it and run `cecai-convert toolchain --fetch` again",
        )


def sdist_path(*, fetch: bool = True, source: Path | None = None) -> Path:
    """The cached, checksum-verified sdist of the pinned llama-cpp-python.

    Args:
        fetch: download it with pip when it is not cached yet.
        source: a local copy of the sdist to adopt instead of downloading (offline images, air-gapped hosts).

    Raises:
        ToolchainError: the download failed or the file does not match :data:`SDIST_SHA256`.
    """
    target = _version_dir() / _SDIST_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        _check_sdist(source)
        tmp = target.with_suffix(".part")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return target
    if not fetch:
        raise ToolchainError(
            f"the llama.cpp converter for llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} is not in {cache_root()}",
            hint="run `cecai-convert toolchain --fetch` once with access to the package index",
        )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmpdir:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
            "-d", tmpdir, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        ]  # fmt: skip
        run = run_tool(cmd, tail_lines=20)
        downloaded = Path(tmpdir) / _SDIST_NAME
        if run.returncode != 0 or not downloaded.is_file():
            raise ToolchainError(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
                f"(pip exit {run.returncode}): {run.tail.strip()[-500:]}",
                hint="check access to the package index, or pass a local copy: "
                "`cecai-convert toolchain --fetch --sdist llama_cpp_python-X.tar.gz`",
            )
        _check_sdist(downloaded)
        os.replace(downloaded, target)
    return target


def extract_llama_cpp(sdist: Path, dest: Path, prefixes: tuple[str, ...] = ("",)) -> Path:
    """Extract the sdist's vendored llama.cpp (``*/vendor/llama.cpp/<prefix>…``) into ``dest``; return ``dest``.

    The one extraction of the sdist: :func:`ensure_converter` takes the converter files, :mod:`.llama_programs` the
    whole tree to build the tools. ``dest`` becomes the llama.cpp root (its ``CMakeLists.txt`` at the top). Only
    files and folders are written, never outside ``dest``, whatever the archive says.

    Raises:
        ToolchainError: the file is not a readable tarball or holds no ``vendor/llama.cpp/`` tree.
    """
    found = False
    root = dest.resolve()
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if len(parts) < 3 or parts[1:3] != _VENDOR_PARTS:
                    continue
                found = True
                rel = "/".join(parts[3:])
                if not rel or not any(rel == p.rstrip("/") or rel.startswith(p) for p in prefixes):
                    continue
                target = dest / rel
                if not target.resolve().is_relative_to(root):
                    continue
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    if src is None:
                        continue
                    with src, target.open("wb") as fh:
                        shutil.copyfileobj(src, fh)
                    target.chmod(0o755 if member.mode & 0o111 else 0o644)
    except (OSError, tarfile.TarError) as exc:
        raise ToolchainError(
            f"cannot extract llama.cpp from {sdist}: {exc}",
            hint="the cached sdist may be damaged; delete it and run `cecai-convert toolchain --fetch`",
        ) from None
    if not found:
        raise ToolchainError(
            f"{Path(sdist).name} holds no vendor/llama.cpp/ tree",
            hint="the file is not a llama-cpp-python sdist; delete it and run `cecai-convert toolchain --fetch`",
        )
    return dest


def ensure_converter(*, fetch: bool = True, source: Path | None = None) -> Path:
    """The folder holding ``convert_hf_to_gguf.py`` of the pinned version, extracting it on first use.

    The folder is replaced atomically, so an interrupted extraction never leaves a half tree behind.
    """
    converter = _version_dir() / "converter"
    marker = converter / _MARKER
    if marker.is_file():
        return converter
    sdist = sdist_path(fetch=fetch, source=source)
    staging = Path(tempfile.mkdtemp(prefix=".converter-", dir=converter.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the converter from other users (an image's non-root user)
    try:
        extract_llama_cpp(sdist, staging, _CONVERTER_MEMBERS)
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise ToolchainError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        (staging / _MARKER).write_text(
            json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "sdist_sha256": SDIST_SHA256}) + "\n"
        )
        if converter.exists():
            shutil.rmtree(converter)
        os.replace(staging, converter)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return converter


def require_runtime() -> None:
    """Fail clearly unless the installed llama-cpp-python is the pinned one.

    Raises:
        ToolNotFound: llama-cpp-python is not installed.
        ToolchainError: another version is installed (the converter and the runtime would disagree).
    """
    version = installed_runtime_version()
    if version is None:
        raise ToolNotFound(
            "llama-cpp-python is not installed; the local backend needs it",
            hint="pip install 'cecai-converter[local]'  (or use --backend docker)",
        )
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise ToolchainError(
            f"llama-cpp-python {version} is installed, but this release pins {LLAMA_CPP_PYTHON_VERSION}: "
            "the converter and the runtime must be the same llama.cpp",
            hint=f"pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}'",
        )


@dataclass(frozen=True)
class Toolchain:
    """What ``cecai-convert toolchain`` reports and every manifest records."""

    llama_cpp_python: str
    sdist_sha256: str
    runtime_installed: str | None
    converter_dir: Path | None
    cache: Path

    def as_manifest(self) -> dict[str, str]:
        """The part recorded in manifests (no local paths: they differ between machines)."""
        return {"llama_cpp_python": self.llama_cpp_python, "sdist_sha256": self.sdist_sha256}


def toolchain_info() -> Toolchain:
    """The pin and the state of this machine's toolchain, without fetching anything."""
    converter = _version_dir() / "converter"
    return Toolchain(
        llama_cpp_python=LLAMA_CPP_PYTHON_VERSION,
        sdist_sha256=SDIST_SHA256,
        runtime_installed=installed_runtime_version(),
        converter_dir=converter if (converter / _MARKER).is_file() else None,
        cache=cache_root(),
    )
