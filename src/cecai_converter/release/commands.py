"""``cecai-convert publish``: attach GGUF files, their manifests and ``SHA256SUMS`` to a GitHub release
(:func:`~.publish.publish_release`) and/or push them to a Hugging Face model repo (:func:`~.hub_push.push_to_hub`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..card import hub_card
from ..errors import UsageError
from ..output import Output
from ..pairs import parse_pair
from .hub_push import push_to_hub
from .publish import publish_release
from .split import SIZE_LIMIT

__all__ = ["register"]


def _run(args: argparse.Namespace, out: Output) -> int:
    repo = args.repo or os.environ.get("GITHUB_REPOSITORY", "")
    token = os.environ.get("GITHUB_TOKEN", "")
    inputs = [Path(p) for p in args.inputs]
    if not args.tag and not args.hf_repo:
        raise UsageError("give --tag (a GitHub release) and/or --hf-repo (a Hugging Face repo)")
    data: dict[str, Any] = {}
    lines: list[str] = []
    if args.tag:
        result = publish_release(
            inputs,
            repo=repo,
            tag=args.tag,
            token=token,
            publish=not args.draft,
            size_limit=args.split_size,
            target_commitish=args.target,
            on_progress=out.info,
            checks=[Path(c) for c in args.checks or []],
            expected_checks=[_expected(e) for e in args.expect_check or []] or None,
        )
        data = result.as_dict()
        state = "draft" if result.draft else "published"
        lines.append(f"release {result.tag} ({state}): {result.html_url}")
        lines += [f"  uploaded  {n}" for n in result.uploaded]
        lines += [f"  unchanged {n}" for n in result.unchanged]
        lines += [f"  replaced  {n}" for n in result.replaced]
        lines += [f"  split     {orig} -> {len(parts)} parts" for orig, parts in result.split.items()]
    if args.hf_repo:
        card = hub_card(inputs, args.hf_repo, [Path(c) for c in args.checks or []])
        url = push_to_hub(
            inputs,
            args.hf_repo,
            token=os.environ.get("HF_TOKEN") or None,
            revision=args.hf_revision,
            card=card,
            checks=[Path(c) for c in args.checks or []],
        )
        data["hub_commit_url"] = url
        lines.append(f"pushed to {args.hf_repo}: {url}")
    out.result("\n".join(lines), data)
    return 0


def _expected(value: str) -> tuple[str, str]:
    model, sep, pair = value.rpartition(":")
    if not sep or not model:
        raise UsageError(f"--expect-check wants MODEL:PAIR, got {value!r}")
    return model, parse_pair(pair).name


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``publish`` command."""
    parser = subparsers.add_parser(
        "publish",
        help="attach GGUF files, manifests and SHA256SUMS to a GitHub release (and/or push to the Hub)",
        description="Attach conversion outputs to the GitHub release for --tag: a draft is found or created, files "
        "are uploaded (split below 2 GB in llama.cpp's split format when needed), then it is published. "
        "Re-runs skip identical files and never replace other assets. The token comes from GITHUB_TOKEN "
        "(and HF_TOKEN for --hf-repo) only.",
    )
    parser.add_argument("inputs", nargs="+", metavar="PATH", help="conversion output folders or .gguf files")
    parser.add_argument("--tag", help="the release tag")
    parser.add_argument("--repo", help="owner/name (default: GITHUB_REPOSITORY)")
    parser.add_argument("--draft", action="store_true", help="leave the release a draft")
    parser.add_argument("--target", metavar="COMMIT", help="commit for the tag, if the tag does not exist yet")
    parser.add_argument(
        "--split-size",
        type=int,
        default=SIZE_LIMIT,
        metavar="BYTES",
        help=f"split GGUF files of this size or more (default and maximum {SIZE_LIMIT})",
    )
    parser.add_argument(
        "--checks",
        action="append",
        metavar="PATH",
        help="check records (`cecai-convert check`), or folders holding them: merged into each model's manifest and "
        "the release notes; a failed one leaves the release a draft (repeatable)",
    )
    parser.add_argument(
        "--expect-check",
        action="append",
        metavar="MODEL:PAIR",
        help="a check that must have a record, else the release stays a draft (repeatable)",
    )
    parser.add_argument("--hf-repo", metavar="REPO_ID", help="also push to this Hugging Face model repo (HF_TOKEN)")
    parser.add_argument("--hf-revision", metavar="BRANCH", help="the Hub branch to commit to (default: main)")
    parser.set_defaults(handler=_run)
