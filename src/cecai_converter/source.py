"""Model sources: a local Hugging Face folder or a Hub repository, checked before any conversion starts.

The checks here are cheap and catch the common bad inputs with a precise message before the converter (which
needs torch and takes seconds to start) ever runs: a missing folder or ``config.json``, no weights, truncated or
corrupt safetensors, pickle-only weights (unpickling runs code), an architecture the pinned llama.cpp does not know.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import fnmatch
import hashlib
import importlib
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final, TypeGuard

from .errors import ConversionFailed, UnsupportedModel, UsageError
from .fsutil import sha256_file
from .names import check_plain_name, show
from .toolchain import LLAMA_CPP_PYTHON_VERSION

__all__ = [
    "HUB_PATTERNS",
    "ModelSource",
    "check_model_dir",
    "converter_map_keys",
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
    # the chat template the converter copies into the GGUF (and the source check compares), when kept apart
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
)
_PICKLE_SUFFIXES: Final = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAFETENSORS_MAX_HEADER: Final = 100 * 1024 * 1024  # the safetensors format's own limit
#: Bits per element of each safetensors dtype (the format's list; F4 and F6 are packed).
_DTYPE_BITS: Final = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16,
    "U32": 32, "I32": 32, "F32": 32,
    "U64": 64, "I64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
#: More dimensions than any model tensor has; bounds the work of checking a hostile shape.
_MAX_DIMS: Final = 16
#: A git commit id as the Hub gives it: the only revision that becomes a folder name.
_COMMIT: Final = re.compile(r"[0-9a-f]{40}")
#: llama.cpp keeps vocabulary, width and context sizes in 32-bit integers.
_GGUF_INT_LIMIT: Final = 2**31
#: config.json sizes that must be positive 32-bit integers when present (top level or ``text_config``).
_CONFIG_INT_KEYS: Final = (
    "vocab_size", "hidden_size", "n_embd", "d_model", "max_position_embeddings", "n_positions", "n_ctx",
)  # fmt: skip


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


def converter_map_keys(converter_dir: Path, map_name: str) -> frozenset[str]:
    """The string keys of the annotated dict ``map_name`` in the pinned converter's ``conversion/__init__.py``
    (``TEXT_MODEL_MAP``, ``MMPROJ_MODEL_MAP``: architecture → module), read without importing it (no torch).

    Raises:
        OSError, SyntaxError: the file cannot be read or parsed.
    """
    init = converter_dir / "conversion" / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        value = node.value if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == map_name and isinstance(value, ast.Dict):
            return frozenset(k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return frozenset()


@cache
def supported_architectures(converter_dir: Path) -> frozenset[str]:
    """The Hugging Face architecture names the pinned converter registers, read without importing it (no torch)."""
    return converter_map_keys(converter_dir, "TEXT_MODEL_MAP")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_safetensors(path: Path) -> int:
    """Check a safetensors file against its own header, as the safetensors library does before it maps the data.

    The header is a JSON object; each tensor has a known ``dtype``, a ``shape`` of non-negative integers and
    ``data_offsets`` ``[begin, end]`` inside the data section, whose span is exactly the shape's element count times
    the dtype's size; sorted by offset, the tensors cover the data section without overlap or gap, up to the end of
    the file.

    Returns:
        The size of the data section (the weight bytes), for the bounds on ``config.json``.

    Raises:
        UsageError: ``<file> is truncated or corrupt: <why>``.
    """
    size = path.stat().st_size

    def bad(why: str) -> UsageError:
        return UsageError(
            f"{path.name} is truncated or corrupt: {why}",
            hint="the file does not match its own header: download or copy it again "
            "(an interrupted `git lfs pull` or copy leaves such files)",
        )

    if size < 8:
        raise bad("it is shorter than the 8-byte header length")
    with path.open("rb") as fh:
        header_len: int = struct.unpack("<Q", fh.read(8))[0]
        if header_len > min(_SAFETENSORS_MAX_HEADER, size - 8):
            raise bad(f"the header length {header_len} is larger than the file or the format's limit")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, or nested deeper than the parser's stack
        raise bad("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data_size = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        label = f"tensor {show(name)}"
        if not isinstance(info, dict):
            raise bad(f"{label}: expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        bits = _DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            raise bad(f"{label}: unknown dtype {show(dtype)}")
        if not (
            isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_is_int(d) and 0 <= d < 2**64 for d in shape)
        ):
            raise bad(
                f"{label}: the shape {show(shape)} is not a list of at most {_MAX_DIMS} non-negative 64-bit integers"
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise bad(f"{label}: data_offsets {show(offsets)} are not [begin, end] within the {data_size} data bytes")
        span_bits = (offsets[1] - offsets[0]) * 8
        elements = 1
        for dim in shape:  # in order, in 64 bits, as the library counts (so [2**64, 0] is refused, not 0 elements)
            elements *= dim
            if elements >= 2**64:
                raise bad(f"{label}: the shape {show(shape)} has more elements than a 64-bit count holds")
        if elements * bits != span_bits:
            raise bad(f"{label}: the shape {show(shape)} of {dtype} does not fill its data_offsets {show(offsets)}")
        spans.append((offsets[0], offsets[1], name))
    # Like the safetensors library: sorted by offsets, the tensors tile the data section (no overlap, no gap).
    end, previous = 0, ""
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise bad(f"the data of tensors {show(previous)} and {show(name)} overlap")
        if begin > end:
            raise bad(f"bytes {end} to {begin} of the data section belong to no tensor (before {show(name)})")
        end, previous = stop, name
    if end != data_size:
        raise bad(f"the tensors end at byte {end} of a data section of {data_size} bytes")
    return data_size


def _check_index(path: Path, index: Path) -> None:
    """``model.safetensors.index.json``: its ``weight_map`` names shards that are plain files in the model folder.

    The converter opens every shard the index names; a name such as ``../../x.safetensors`` would read weights from
    outside the folder, which the fingerprint does not cover (so a changed file there would go unnoticed).
    """
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nested too deep
        raise UsageError(f"{index} is not valid JSON: {show(str(exc))}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise UsageError(
            f"{index}: `weight_map` must be an object mapping tensor names to shard files, found "
            f"{type(weight_map).__name__}",
            hint="download the repository's index again, or remove it for a single-file model",
        )
    shards: set[str] = set()
    for tensor, shard in weight_map.items():
        why = check_plain_name(shard)
        if why is None and not shard.endswith(".safetensors"):
            why = f"{show(shard)} is not a .safetensors file"
        if why is not None:
            raise UsageError(
                f"{index}: weight_map[{show(tensor)}]: {why}",
                hint="every shard must be a .safetensors file in the model folder, named without a path",
            )
        shards.add(shard)
    # A shard may be a symbolic link (a Hugging Face cache snapshot links every file to ../../blobs/): the link is in
    # the folder, and the fingerprint hashes what it points to, so a changed target is noticed.
    missing = sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise UsageError(
            f"{path}: the safetensors index names shards that are missing: {', '.join(missing)}",
            hint="download the complete repository",
        )


def _config_int(config: Mapping[str, Any], key: str, config_path: Path) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if not _is_int(value) or not 0 < value < _GGUF_INT_LIMIT:
        raise UsageError(
            f"{config_path}: {key} must be a positive integer below 2**31, got {show(value)}",
            hint="llama.cpp stores it as a 32-bit integer; check config.json against the model's original",
        )
    return value


def _check_config_bounds(config: Mapping[str, Any], config_path: Path, weight_bytes: int) -> None:
    """Sizes in ``config.json`` that the weights cannot back are refused before the converter allocates them.

    The converter builds one vocabulary entry per ``vocab_size`` (it pads a short tokenizer with placeholder
    tokens), so ``vocab_size: 2**62`` made it grow until the kernel killed it. The token embedding holds
    ``vocab_size × hidden_size`` weights, and no safetensors dtype stores a weight in fewer than 4 bits (F4), so a
    real checkpoint always has ``vocab_size × hidden_size × 0.5 <= weight bytes``; a factorized embedding (ALBERT)
    is the only exception we know of, and even it stays far inside this bound, since its other layers are
    ``hidden_size`` wide. Every size must also fit the 32-bit fields llama.cpp keeps it in.
    """
    for scope in (config, config.get("text_config")):
        if not isinstance(scope, Mapping):
            continue
        for key in _CONFIG_INT_KEYS:
            _config_int(scope, key, config_path)
        vocab = _config_int(scope, "vocab_size", config_path)
        hidden = next((v for k in ("hidden_size", "n_embd", "d_model") if (v := scope.get(k)) is not None), 1)
        if vocab is not None and vocab * hidden > 2 * weight_bytes:
            raise UsageError(
                f"{config_path}: vocab_size {vocab} × hidden size {hidden} is more than the weights can hold "
                f"({weight_bytes} bytes of weights: at most {2 * weight_bytes // max(hidden, 1)} tokens)",
                hint="config.json does not belong to these weights, or was edited: copy it again from the model",
            )


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
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nested deeper than the parser's stack
        raise UsageError(f"{config_path} is not valid JSON: {show(str(exc))}") from None
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
        _check_index(path, index)
    is_pickle = False
    if safetensors:
        weight_bytes = sum(_check_safetensors(weights_file) for weights_file in safetensors)
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
        weight_bytes = sum(p.stat().st_size for p in pickles)  # a pickle's overhead only loosens the bound
        is_pickle = True
    else:
        raise UsageError(
            f"{path} holds no weights (*.safetensors)",
            hint="the folder needs the model's *.safetensors files next to config.json",
        )
    _check_config_bounds(config, config_path, weight_bytes)

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


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse, before anything else is derived from it (the output stem).

    Raises:
        UsageError: not a valid ``owner/name``.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"{repo_id!r} is not a valid Hub repo id: {exc}", hint="use owner/name") from None


def _hub_answer_problem(sha: object, names: list[object]) -> str | None:
    """What is wrong with the Hub's answer about a repository, before any of it becomes a path; None when sound.

    The commit id becomes a folder name and the file names become paths under it: an endpoint (``HF_ENDPOINT`` may
    name any server) answering ``../../x`` would have us write outside the download folder.
    """
    if not isinstance(sha, str) or not _COMMIT.fullmatch(sha):
        return f"its commit id {show(sha)} is not 40 lowercase hex digits"
    for name in names:
        if not isinstance(name, str) or not any(fnmatch.fnmatch(name, pattern) for pattern in HUB_PATTERNS):
            continue  # files we do not download are not our business
        why = f"{show(name)} is not a relative path" if name.startswith("/") or "\\" in name else None
        for part in name.split("/"):  # no `..`, `.` or empty component, no control character
            part_why = check_plain_name(part)
            why = why or (f"{show(name)}: {part_why}" if part_why else None)
        if why is not None:
            return f"it lists a file name that is no plain relative path: {why}"
    return None


def fetch_from_hub(repo_id: str, revision: str | None, dest_root: Path) -> tuple[Path, str]:
    """Download only the files a conversion needs from a Hub repository.

    The token comes from ``HF_TOKEN`` (read by huggingface_hub itself; never printed). ``HF_ENDPOINT`` selects
    another Hub (a mirror or an internal server). The Hub's answers are input like any other: the commit id must be
    40 hex digits and every listed file name a plain relative path before either becomes a path.

    Returns:
        The local folder and the resolved commit SHA (recorded in the manifest, so a moving branch is pinned).

    Raises:
        UsageError: the repository or revision does not exist, or access is denied.
        ConversionFailed: the download failed (network, disk), the endpoint's answer is unusable (a commit id or a
            file name that is no plain name), or huggingface_hub refused it.
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
        names: list[object] = [getattr(s, "rfilename", None) for s in info.siblings or []]
        problem = _hub_answer_problem(info.sha, names)
        if problem is not None:
            raise ConversionFailed(
                f"the Hub's answer about {repo_id} cannot be used: {problem}; nothing was downloaded",
                hint="HF_ENDPOINT must name a Hugging Face Hub (or a faithful mirror); check it, or download the "
                "repository yourself and convert the local folder",
            )
        resolved = str(info.sha)
        folder = dest_root / repo_id.replace("/", "--") / resolved
        local = snapshot_download(
            repo_id,
            revision=resolved,
            allow_patterns=list(HUB_PATTERNS),
            local_dir=folder,
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
        raise UsageError(f"{repo_id!r} is not a valid Hub repo id: {show(str(exc))}", hint="use owner/name") from None
    except hf_errors.RemoteEntryNotFoundError as exc:
        raise ConversionFailed(
            f"the Hub listed a file of {repo_id} that it then did not serve: {show(str(exc))}",
            hint="the repository changed during the download, or HF_ENDPOINT is not a faithful mirror; try again",
        ) from None
    except network_errors as exc:
        raise ConversionFailed(
            f"downloading {repo_id} failed: {type(exc).__name__}: {show(str(exc))}",
            hint="check network access to the Hub (HF_ENDPOINT for a mirror) and free disk space",
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # huggingface_hub's own refusals of what the endpoint answered (a file name with `..`, a malformed
        # listing or header): the answer is unusable, and a traceback would say nothing more.
        raise ConversionFailed(
            f"huggingface_hub refused the Hub's answer about {repo_id}: {type(exc).__name__}: {show(str(exc))}",
            hint="HF_ENDPOINT must name a Hugging Face Hub (or a faithful mirror); check it and try again",
        ) from None
    if not Path(local).resolve().is_relative_to(dest_root.resolve()):
        raise ConversionFailed(f"the download of {repo_id} landed outside {dest_root}: {show(str(local))}")
    return Path(local), resolved
