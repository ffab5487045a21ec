"""Model sources: a local Hugging Face folder or a Hub repository, checked before any conversion starts.

The checks here are cheap and catch the common bad inputs with a precise message before the converter (which
needs torch and takes seconds to start) ever runs: a missing folder or ``config.json``, no weights, truncated or
corrupt safetensors, pickle-only weights (unpickling runs code), an architecture the pinned llama.cpp does not know.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import importlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

from .errors import ConversionFailed, UnsupportedModel, UsageError
from .fsutil import sha256_file
from .toolchain import LLAMA_CPP_PYTHON_VERSION

__all__ = [
    "HUB_PATTERNS",
    "ModelSource",
    "check_model_dir",
    "count_parameters",
    "fetch_from_hub",
    "fingerprint_files",
    "looks_like_repo_id",
    "source_dtype",
    "supported_architectures",
]

#: Files a conversion reads; everything else in a Hub repository (READMEs, pickles, ONNX, images) is skipped.
HUB_PATTERNS: Final = (
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
)
_PICKLE_SUFFIXES: Final = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAFETENSORS_MAX_HEADER: Final = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class ModelSource:
    """A checked local model folder and where it came from.

    Attributes:
        path: the folder the converter reads.
        architecture: ``config.json``'s first ``architectures`` entry.
        weights: the weight files, relative to ``path``.
        pickle: the weights are pickle files (only with an explicit opt-in).
        repo_id / revision: set for a Hub download; ``revision`` is the resolved commit.
        config: ``config.json``'s content.
    """

    path: Path
    architecture: str
    weights: tuple[str, ...]
    pickle: bool = False
    repo_id: str | None = None
    revision: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)


@cache
def supported_architectures(converter_dir: Path) -> frozenset[str]:
    """The Hugging Face architecture names the pinned converter registers, read without importing it (no torch)."""
    init = converter_dir / "conversion" / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return frozenset()


def _check_safetensors(path: Path) -> None:
    """Check that a safetensors file's header parses and its data section has exactly the size the header says."""
    size = path.stat().st_size
    bad = UsageError(
        f"{path.name} is truncated or corrupt",
        hint="the file does not match its own header: download or copy it again "
        "(an interrupted `git lfs pull` or copy leaves such files)",
    )
    if size < 8:
        raise bad
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(_SAFETENSORS_MAX_HEADER, size - 8):
            raise bad
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad from None
    if not isinstance(header, dict):
        raise bad
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise bad
        end = max(end, int(offsets[1]))
    if 8 + header_len + end != size:
        raise bad


def check_model_dir(
    path: Path,
    converter_dir: Path | None = None,
    *,
    allow_pickle: bool = False,
) -> ModelSource:
    """Check a local Hugging Face model folder and describe it.

    Args:
        path: the folder.
        converter_dir: the pinned converter, to check the architecture against; skipped when None.
        allow_pickle: accept pickle (``.bin``) weights when no safetensors exist.

    Raises:
        UsageError: missing folder, ``config.json`` or weights; corrupt safetensors.
        UnsupportedModel: pickle-only weights without the opt-in; an architecture llama.cpp does not support.
    """
    if not path.is_dir():
        raise UsageError(
            f"model folder not found: {path}",
            hint="MODEL_NAME must name a folder under MODELS_PATH (or pass a local folder / Hub repo id)",
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UsageError(
            f"{path} has no config.json: it is not a Hugging Face model folder",
            hint="copy the whole repository (config.json, *.safetensors, tokenizer files), not only the weights",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{config_path} is not valid JSON: {exc}") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not archs or not isinstance(archs, list):
        raise UnsupportedModel(
            f"{config_path} names no `architectures`",
            hint='the converter picks its model class from config.json\'s `architectures`, e.g. ["LlamaForCausalLM"]',
        )
    architecture = str(archs[0])

    safetensors = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    pickles = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _PICKLE_SUFFIXES)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{index} is not valid JSON: {exc}") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UsageError(
                f"{path}: the safetensors index names shards that are missing: {', '.join(missing)}",
                hint="download the complete repository",
            )
    is_pickle = False
    if safetensors:
        for weights_file in safetensors:
            _check_safetensors(weights_file)
        weights = tuple(p.name for p in safetensors)
    elif pickles:
        if not allow_pickle:
            raise UnsupportedModel(
                f"{path} has only pickle weights ({', '.join(p.name for p in pickles)}); loading them runs "
                "arbitrary code from the file, so they are refused by default",
                hint="convert them to safetensors first (many Hub repos offer a safetensors revision), or, for a "
                "model you trust, pass --allow-pickle (ALLOW_PICKLE: true)",
            )
        weights = tuple(p.name for p in pickles)
        is_pickle = True
    else:
        raise UsageError(
            f"{path} holds no weights (*.safetensors)",
            hint="the folder needs the model's *.safetensors files next to config.json",
        )

    if converter_dir is not None:
        known = supported_architectures(converter_dir)
        if known and architecture not in known:
            close = difflib.get_close_matches(architecture, sorted(known), n=3, cutoff=0.6)
            similar = f" Similar supported names: {', '.join(close)}." if close else ""
            raise UnsupportedModel(
                f"architecture {architecture!r} is not supported by the pinned llama.cpp "
                f"(llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}).{similar}",
                hint="check llama.cpp's list of supported models; a newer cecai-converter release may pin a "
                "llama.cpp that supports it",
            )
    return ModelSource(path=path, architecture=architecture, weights=weights, pickle=is_pickle, config=config)


def _tensor_infos(source: ModelSource) -> list[dict[str, Any]]:
    """The tensor entries (dtype, shape) of every safetensors file, read from the headers only."""
    infos: list[dict[str, Any]] = []
    for name in source.weights:
        if not name.endswith(".safetensors"):
            continue
        with (source.path / name).open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        infos += [info for key, info in header.items() if key != "__metadata__"]
    return infos


def source_dtype(source: ModelSource) -> str:
    """The float type the checkpoint is stored in (``f32``, ``f16`` or ``bf16``), for a lossless base file."""
    declared = str(source.config.get("torch_dtype") or source.config.get("dtype") or "").lower()
    by_name = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "half": "f16", "float": "f32"}
    if declared in by_name:
        return by_name[declared]
    counts: dict[str, int] = {}
    for info in _tensor_infos(source):
        counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    top = max(counts, key=lambda k: counts[k]) if counts else "F16"
    return {"F32": "f32", "BF16": "bf16"}.get(top, "f16")


def count_parameters(source: ModelSource) -> int:
    """The number of weights in the safetensors files, from their headers (0 for pickle weights)."""
    total = 0
    for info in _tensor_infos(source):
        count = 1
        for dim in info.get("shape", []):
            count *= int(dim)
        total += count
    return total


def fingerprint_files(
    root: Path, previous: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Hash every regular file under ``root`` (hidden ones excepted) into one content fingerprint.

    ``previous`` maps relative paths to earlier ``{"bytes", "mtime_ns", "sha256"}`` records: a file whose size and
    modification time are unchanged keeps its recorded hash, so an unchanged re-run of a multi-GB model does not
    re-read it (the same trade-off ``git status`` makes).

    Returns:
        The fingerprint (SHA-256 over sorted ``path size sha256`` lines) and the per-file records.
    """
    previous = previous or {}
    records: list[dict[str, Any]] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in Path(rel).parts):
            continue
        st = path.stat()
        old = previous.get(rel)
        if old and old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256"):
            sha = str(old["sha256"])
        else:
            sha = sha256_file(path)
        records.append({"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
    digest = hashlib.sha256("".join(f"{r['path']} {r['bytes']} {r['sha256']}\n" for r in records).encode())
    return digest.hexdigest(), records


def looks_like_repo_id(value: str) -> bool:
    """True for ``owner/name`` strings that are not an existing local path."""
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not Path(value).exists() and not value.startswith((".", "/", "~"))


def fetch_from_hub(repo_id: str, revision: str | None, dest_root: Path) -> tuple[Path, str]:
    """Download only the files a conversion needs from a Hub repository.

    The token comes from ``HF_TOKEN`` (read by huggingface_hub itself; never printed). ``HF_ENDPOINT`` selects
    another Hub (a mirror or an internal server).

    Returns:
        The local folder and the resolved commit SHA (recorded in the manifest, so a moving branch is pinned).

    Raises:
        UsageError: the repository or revision does not exist, or access is denied.
        ConversionFailed: the download failed (network, disk).
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    # huggingface_hub >= 1 talks HTTP through httpx (2.x: its fork httpx2), whose transport errors (refused or
    # dropped connections, timeouts) are not OSError: without them a Hub going away mid-download was a traceback.
    network_errors: tuple[type[BaseException], ...] = (hf_errors.HfHubHTTPError, OSError)
    for client in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            network_errors += (importlib.import_module(client).HTTPError,)
    token = os.environ.get("HF_TOKEN") or None
    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
        resolved = info.sha or revision or "main"
        local = snapshot_download(
            repo_id,
            revision=resolved,
            allow_patterns=list(HUB_PATTERNS),
            local_dir=dest_root / repo_id.replace("/", "--") / resolved,
            token=token,
        )
    except hf_errors.GatedRepoError:
        raise UsageError(
            f"{repo_id} is gated: " + ("your token has not been granted access" if token else "HF_TOKEN is not set"),
            hint="accept the model's licence on its Hub page, then set HF_TOKEN to a token of that account",
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise UsageError(
            f"Hub repository {repo_id!r} not found (or private without a token)",
            hint="check the repo id; for a private repository set HF_TOKEN",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise UsageError(
            f"revision {revision!r} not found in {repo_id}", hint="use a branch, tag or commit SHA"
        ) from None
    except hf_errors.HFValidationError as exc:
        raise UsageError(f"{repo_id!r} is not a valid Hub repo id: {exc}", hint="use owner/name") from None
    except network_errors as exc:
        raise ConversionFailed(
            f"downloading {repo_id} failed: {type(exc).__name__}: {str(exc)[:300]}",
            hint="check network access to the Hub (HF_ENDPOINT for a mirror) and free disk space",
        ) from None
    return Path(local), resolved
