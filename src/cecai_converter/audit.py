"""``cecai-convert audit GGUF… --source MODEL_DIR|OWNER/NAME[@REVISION]``: is a GGUF faithful to its source model?

The comparison every conversion runs on its base (:mod:`cecai_converter.source_parity`: tokenizer, chat template,
hyperparameters, logits), on any GGUF file: ours, or one downloaded from anywhere that claims to come from a model.
A Hub source is downloaded through :func:`cecai_converter.source.fetch_from_hub` (only the files a conversion
needs). Exit 0 when every file is faithful, 1 when one is not, 2 for bad input.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Final

from .errors import EXIT_FAILED, EXIT_OK, GGUFHeaderError, UsageError
from .gguf_header import read_header
from .names import show
from .output import Output
from .precisions import PRECISIONS
from .source import check_repo_id, fetch_from_hub, looks_like_repo_id
from .source_parity import MAX_NMSE, check_source, summary

__all__ = ["MAX_NMSE_QUANTIZED", "default_nmse_limit", "register"]


def _hub_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cecai-converter" / "hub"


def resolve_source(text: str, out: Output) -> tuple[Path, dict[str, Any]]:
    """The local folder of ``--source`` (a folder, or ``owner/name[@revision]`` downloaded from the Hub) and its record.

    Raises:
        UsageError: neither an existing folder nor a valid repo id; a Hub repository or revision that does not exist.
    """

    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"--source {show(text)}: the folder has no config.json",
                hint="give the Hugging Face model folder the GGUF was converted from (config.json, weights, tokenizer)",
            )
        return folder.resolve(), {"kind": "local", "path": str(folder.resolve())}
    repo, _, revision = text.partition("@")
    if not looks_like_repo_id(repo):
        raise UsageError(
            f"--source {show(text)} is neither a model folder nor a Hub repo id",
            hint="give a local folder, or owner/name[@revision]",
        )
    check_repo_id(repo)
    with out.step(f"downloading {repo}" + (f"@{revision}" if revision else "")):
        local, resolved = fetch_from_hub(repo, revision or None, _hub_cache())
    return local, {"kind": "hub", "repo_id": repo, "revision": resolved}


#: The default NMSE limit of a file quantized below 8 bits: the upper end of what llama.cpp's check-nmse calls
#: "acceptable". Such a file is meant to differ from its source by more than a conversion may (MAX_NMSE), and an
#: audit asks whether it comes from that source, not whether it was converted without loss.
MAX_NMSE_QUANTIZED: Final = 0.1


def default_nmse_limit(file_type: object) -> tuple[float, str]:
    """The NMSE limit an audit applies to a file of ``general.file_type`` ``file_type``, and why.

    Float files (F32, F16, BF16) and Q8_0 are held to the conversion limit (:data:`source_parity.MAX_NMSE`); files
    quantized further to :data:`MAX_NMSE_QUANTIZED`. An unknown type gets the conversion limit (the strict one).
    """

    info = next((p for p in PRECISIONS.values() if isinstance(file_type, int) and p.ftype == file_type), None)
    if info is None or info.is_float or info.name == "Q8_0":
        name = info.name if info is not None else f"file type {file_type!r}"
        return MAX_NMSE, f"{name}: the conversion limit"
    return MAX_NMSE_QUANTIZED, f"{info.name}: quantized below 8 bits, llama.cpp's 'acceptable' bound"


def _file_type(path: Path) -> object:

    try:
        return read_header(path).metadata.get("general.file_type")
    except (OSError, GGUFHeaderError) as exc:
        raise UsageError(f"{path} is not a readable GGUF file ({exc})") from None


def _cmd_audit(args: argparse.Namespace, out: Output) -> int:

    files: list[Path] = list(args.files)
    for path in files:
        if not path.is_file():
            raise UsageError(f"GGUF file not found: {path}", hint="give the path of a .gguf file")
    if args.max_nmse is not None and not args.max_nmse > 0:
        raise UsageError(f"--max-nmse must be a positive number, got {args.max_nmse}")
    # Every file is read before anything is downloaded or loaded: a file that is not a GGUF is bad input (exit 2).
    file_types = {path: _file_type(path) for path in files}
    folder, source = resolve_source(args.source, out)
    rows: list[dict[str, Any]] = []
    for path in files:
        if args.max_nmse is not None:
            limit, why = args.max_nmse, "--max-nmse"
        else:
            limit, why = default_nmse_limit(file_types[path])
        limits = {"max_nmse": limit}
        with out.step(f"comparing {path.name} with {args.source} (NMSE limit {limit:g}: {why})"):
            record = check_source(
                folder, path, trust_remote_code=args.trust_remote_code, eval_text=args.eval_text, limits=limits,
                threads=args.threads,
            )  # fmt: skip
        rows.append({"file": str(path), "faithful": bool(record.passed), "nmse_limit": limit,
                     "nmse_limit_why": why, "source_parity": record.to_dict()})  # fmt: skip
    lines = [f"source: {args.source}" + (f" ({source['revision']})" if source.get("revision") else "")]
    for row in rows:
        parity = row["source_parity"]
        lines.append(f"{'ok  ' if row['faithful'] else 'FAIL'}  {row['file']}: {summary(parity)}")
        lines += [f"      - {failure}" for failure in parity["failures"]]
    faithful = all(row["faithful"] for row in rows)
    out.result("\n".join(lines), {"source": source, "faithful": faithful, "files": rows})
    return EXIT_OK if faithful else EXIT_FAILED


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` to the CLI."""
    p = sub.add_parser(
        "audit",
        help="check GGUF files against the model they claim to come from (tokenizer, chat template, logits)",
        description="Compare each GGUF with a source model: tokenizer (token ids on a shipped corpus and every "
        "added/special token), chat template, hyperparameters and logits (NMSE as llama.cpp's check-nmse, "
        "KL-divergence, top-1). Exit 0: every file is faithful; 1: one is not; 2: bad input.",
    )
    p.add_argument("files", type=Path, nargs="+", metavar="GGUF")
    p.add_argument(
        "--source", required=True, metavar="MODEL_DIR|OWNER/NAME[@REVISION]",
        help="the Hugging Face model folder, or Hub repository (only the files a conversion needs are downloaded)",
    )  # fmt: skip
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="let transformers run the repository's own model code where the model needs it (only for models you "
        "trust); without it such a model's logits are not compared, and the result says so",
    )  # fmt: skip
    p.add_argument("--eval-text", type=Path, help="the text the logits are compared on (default: the shipped text)")
    p.add_argument(
        "--max-nmse", type=float, metavar="X",
        help="the NMSE at or above which a file fails (default: 1e-2, llama.cpp's pass mark for a conversion, for "
        "F32/F16/BF16/Q8_0 files; 0.1, the end of what llama.cpp calls acceptable, for files quantized further)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="CPU threads for torch and llama.cpp (default: theirs)")
    p.set_defaults(handler=_cmd_audit)
