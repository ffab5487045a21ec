"""The ``card`` and ``reproduce`` commands: a Hugging Face model card from a manifest, and a rebuild that
compares every file's SHA-256 with the manifest's."""

from __future__ import annotations

import argparse
from pathlib import Path

from .card import write_card
from .errors import EXIT_FAILED, EXIT_OK
from .output import Output
from .processes import thread_count
from .records import read_records
from .reproduce import render, reproduce

__all__ = ["register"]


def _card(args: argparse.Namespace, out: Output) -> int:

    records = None
    if args.checks:
        records = read_records([Path(c) for c in args.checks])
    path = write_card(Path(args.outdir), args.output, check_records=records, repo_id=args.hf_repo)
    out.result(f"wrote {path}", {"card": str(path)})
    return EXIT_OK


def _reproduce(args: argparse.Namespace, out: Output) -> int:

    result = reproduce(
        Path(args.manifest),
        out,
        source=args.source,
        workdir=args.workdir,
        imatrix=args.imatrix,
        threads=args.threads,
    )
    out.result(render(result), result.as_dict())
    return EXIT_OK if result.ok else EXIT_FAILED


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``card`` and ``reproduce`` commands."""
    p = subparsers.add_parser(
        "card",
        help="write a Hugging Face model card (README.md) for a conversion's files",
        description="Write a model card from a conversion's manifest: YAML metadata (base_model, the source's "
        "license, tags, quantized_by), a files table with fidelity and error bars, per-pair check results, a "
        "llama-cpp-python example and the command that reproduces the files.",
    )
    p.add_argument("outdir", type=Path, metavar="OUTDIR", help="an outputs folder, or a <model>.manifest.json")
    p.add_argument(
        "-o", "--output", type=Path, help="where to write the card (default: README.md next to the manifest)"
    )
    p.add_argument(
        "--checks", action="append", metavar="PATH", help="check records, or folders holding them (repeatable)"
    )
    p.add_argument("--hf-repo", metavar="REPO_ID", help="the Hub repo the card is for (usage example)")
    p.set_defaults(handler=_card)

    r = subparsers.add_parser(
        "reproduce",
        help="rebuild a conversion from its manifest and compare every file's SHA-256",
        description="Rebuild the files a manifest lists from its recorded inputs (source fingerprint or Hub "
        "commit, llama.cpp pin, precisions, base type, importance matrix) into a fresh folder, never the original "
        "outputs, and compare SHA-256s. Exit 0 when every file matches; 1 when one differs (each is named, with "
        "the recorded input that changed); 2 when an input cannot be found.",
    )
    r.add_argument("manifest", type=Path, metavar="MANIFEST", help="manifest.json, <model>.manifest.json or a folder")
    r.add_argument(
        "--source", type=Path, help="the local model folder (required for a published manifest of a local model)"
    )
    r.add_argument("--workdir", type=Path, help="rebuild here and keep the files (a new or empty folder)")
    r.add_argument("--imatrix", type=Path, help="the recorded importance matrix, if not next to the manifest")
    r.add_argument("--threads", type=thread_count, help="quantizer threads (default: all cores)")
    r.set_defaults(handler=_reproduce)
