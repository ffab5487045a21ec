"""Attach GGUF files, their manifests and ``SHA256SUMS`` to a GitHub release: plan, upload, finalize.

The rules GitHub imposes, and how this module keeps them:

* **Immutable releases** refuse new assets once published. Files go to a *draft* release (found or created for the
  tag), and the draft is published last. A release that is already published and immutable is only accepted when
  every file is already there, byte for byte (a re-run); anything new is refused with a clear message.
* **Each asset must stay below 2 GiB.** A GGUF file of :data:`SIZE_LIMIT` bytes or more is split in llama.cpp's
  split format (what ``llama-gguf-split --split`` writes: ``<name>-00001-of-0000N.gguf``, ``split.*`` keys), which
  llama.cpp and llama-cpp-python load directly from the first part. The release notes say so.
* **Re-runs never clobber.** An asset with the same name and the same SHA-256 is skipped; a *different* file under
  a name that is already taken is an error, found before anything is uploaded. Assets this tool did not write are
  never touched. ``SHA256SUMS`` is the one file it rewrites, merged with the lines already there.
* **Nothing half-published.** A failed upload deletes every asset this run uploaded and leaves the release as it was
  (a draft stays a draft). On a published, mutable release, new files are uploaded under temporary names and renamed
  only after all of them arrived.

A run is three steps: :func:`plan_release` (checks the inputs, stages parts, release manifests and ``SHA256SUMS``,
compares them with the release; reads from GitHub only, so every refusal comes before the first write),
:func:`upload_release` (creates the draft if needed, uploads, renames into place) and :func:`finalize_release`
(release notes, then publishing the draft unless a check failed). The REST calls go through
:class:`~.github.GitHubClient`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import ChecksFailed, ConverterError, GitHubAPIError, PublishFailed, UsageError
from ..fsutil import atomic_write_text, sha256_file
from ..manifest import Manifest
from ..output import decimal_size, get_logger
from ..records import read_records
from ..untrusted_json import loads_bounded
from .assets import CHECKSUMS_NAME, LocalAsset, check_asset_names, checksums_text, collect_assets, parse_checksums
from .github import GitHubClient
from .manifests import attach_checks, check_failures, stable_view
from .notes import fit_notes, notes_row
from .split import SIZE_LIMIT, SPLIT_NAME, original_name, split_large

__all__ = [
    "PARTIAL_SUFFIX",
    "PublishResult",
    "ReleasePlan",
    "draft_or_mutable",
    "finalize_release",
    "plan_release",
    "publish_release",
    "upload_release",
]

#: The suffix of an asset uploaded to a published release before it is renamed to its final name.
PARTIAL_SUFFIX: Final = ".cecai-partial"
_log = get_logger("publish")


@dataclass
class PublishResult:
    """What :func:`publish_release` did."""

    tag: str
    release_id: int
    html_url: str
    draft: bool
    created: bool
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    hub_commit_url: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return {
            "tag": self.tag,
            "release_id": self.release_id,
            "html_url": self.html_url,
            "draft": self.draft,
            "created": self.created,
            "uploaded": self.uploaded,
            "unchanged": self.unchanged,
            "replaced": self.replaced,
            "split": self.split,
            "hub_commit_url": self.hub_commit_url,
        }


def _identical(remote: Mapping[str, Any], asset: LocalAsset, remote_sums: Mapping[str, str]) -> bool | None:
    """True/False when known; None when GitHub gives no digest and SHA256SUMS does not list the file."""
    if int(remote.get("size", -1)) != asset.size:
        return False
    digest = remote.get("digest")
    if isinstance(digest, str) and digest.startswith("sha256:"):
        return digest.removeprefix("sha256:").lower() == asset.sha256
    known = remote_sums.get(asset.name)
    return None if known is None else known == asset.sha256


@dataclass
class ReleasePlan:
    """What a publish run will do, worked out from the local files and the release as it is, before any write.

    Attributes:
        tag: the release's tag.
        release: the release found for the tag; None when a draft is to be created.
        existing: the release's assets by name.
        assets: every asset this run publishes (parts instead of split files, release manifests, SHA256SUMS).
        to_upload: the assets that are new or replace one of ours.
        unchanged: names already there with the same content.
        replaced: manifests whose check records changed (uploaded again).
        stale: leftovers of an interrupted upload, removed before uploading.
        sums: SHA256SUMS as it will be (name → hex digest).
        split: original file name → part names, for files split this run.
        manifests: model name (``model (asset name)`` where a model has several) → release manifest (with its
            ``checks``).
        failures: why the release must stay a draft (failed or missing checks).
    """

    tag: str
    release: dict[str, Any] | None
    existing: dict[str, dict[str, Any]]
    assets: list[LocalAsset]
    to_upload: list[LocalAsset] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    stale: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, str] = field(default_factory=dict)
    split: dict[str, list[str]] = field(default_factory=dict)
    manifests: dict[str, Manifest] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def draft(self) -> bool:
        """Whether the release is (or will be created as) a draft."""
        return self.release is None or bool(self.release.get("draft"))


def plan_release(
    gh: GitHubClient,
    inputs: Sequence[Path],
    *,
    tag: str,
    staging: Path,
    size_limit: int = SIZE_LIMIT,
    checks: Sequence[Path] = (),
    expected_checks: Sequence[tuple[str, str]] | None = None,
    say: Callable[[str], None] = _log.info,
) -> ReleasePlan:
    """Check the inputs, stage what will be uploaded (parts, release manifests, SHA256SUMS) in ``staging``, and
    compare it with the release for ``tag``. Only reads from GitHub.

    Raises:
        UsageError: bad inputs (see :func:`collect_assets`), refused before the first request.
        PublishFailed: a name is taken by a different file, or the release is published, immutable and something
            is new.
    """
    files = collect_assets(inputs)
    check_asset_names(files)
    records = read_records(list(checks)) if checks else []
    files, manifests = attach_checks(files, records, staging)
    assets, split = split_large(files, staging, size_limit)
    check_asset_names(assets)
    release = gh.find_release(tag)
    if release is None:
        say(f"no release for {tag} yet: a draft will be created")
        existing: dict[str, dict[str, Any]] = {}
    else:
        say(f"found {'draft' if release.get('draft') else 'published'} release {release.get('id')} for {tag}")
        existing = {a["name"]: a for a in gh.list_assets(int(release["id"]))}
    plan = ReleasePlan(
        tag=tag,
        release=release,
        existing=existing,
        assets=assets,
        split=split,
        manifests=manifests,
        failures=check_failures(manifests, expected_checks),
    )
    remote_sums: dict[str, str] = {}
    sums_asset = existing.get(CHECKSUMS_NAME)
    if sums_asset is not None and sums_asset.get("state", "uploaded") == "uploaded":
        remote_sums = parse_checksums(gh.download_asset(int(sums_asset["id"])).decode("utf-8", "replace"))
    kept = _compare_assets(gh, plan, remote_sums)
    _plan_checksums(plan, remote_sums, kept, sums_asset, staging)
    # finalize_release renders the notes again, from the release's assets; rendering them now, from what the
    # release will hold, makes notes that GitHub would refuse (over BODY_LIMIT) fail before the first upload.
    sizes = {n: int(a.get("size", 0)) for n, a in existing.items()} | {a.name: a.size for a in assets}
    precisions = {a.name: a.precision or "" for a in assets}
    rows = [(n, sizes[n], plan.sums[n], precisions.get(n, "")) for n in sorted(sizes) if notes_row(n, plan.sums)]
    all_split: dict[str, list[str]] = {}
    for name in sorted(sizes):
        if SPLIT_NAME.match(name):
            all_split.setdefault(original_name(name), []).append(name)
    fit_notes(release.get("body") if release else None, rows, all_split, manifests, tag=tag)
    if release is not None and not plan.draft and release.get("immutable") and (plan.to_upload or plan.stale):
        raise PublishFailed(
            f"release {tag} is published and immutable: GitHub accepts no new assets "
            f"({', '.join(a.name for a in plan.to_upload)}); nothing was uploaded",
            hint="let cecai-convert publish create the release (push the tag only: it makes a draft, uploads, "
            "then publishes), or publish these files under a new tag",
        )
    return plan


def _compare_assets(gh: GitHubClient, plan: ReleasePlan, remote_sums: Mapping[str, str]) -> dict[str, str]:
    """Sort each asset into upload / unchanged / replaced; returns the manifests kept as they are on the release
    (name → the sha256 of the release's copy).

    Raises:
        PublishFailed: a name is taken by a different file that may not be replaced.
    """
    kept: dict[str, str] = {}
    conflicts: list[str] = []
    for asset in plan.assets:
        remote = plan.existing.get(asset.name)
        if remote is None:
            plan.to_upload.append(asset)
        elif remote.get("state", "uploaded") != "uploaded":  # left over by an interrupted upload
            plan.stale.append(remote)
            plan.to_upload.append(asset)
        else:
            same = _identical(remote, asset, remote_sums)
            if same:
                plan.unchanged.append(asset.name)
            elif asset.kind == "manifest":
                # A manifest is ours and derived: the same content but other timings is the same release; other
                # content (a check re-run, a new pair) replaces it where the release still accepts changes.
                body = gh.download_asset(int(remote["id"]))
                if _same_manifest(body, asset.path):
                    plan.unchanged.append(asset.name)
                    kept[asset.name] = hashlib.sha256(body).hexdigest()
                elif plan.release is not None and draft_or_mutable(plan.release):
                    plan.to_upload.append(asset)
                    plan.replaced.append(asset.name)
                else:
                    conflicts.append(f"{asset.name} (the check records changed)")
            else:
                conflicts.append(asset.name if same is False else f"{asset.name} (no checksum to compare)")
    plan.stale += [a for n, a in plan.existing.items() if n.endswith(PARTIAL_SUFFIX)]
    if conflicts:
        raise PublishFailed(
            f"release {plan.tag} already has different files named {', '.join(conflicts)}; nothing was uploaded",
            hint="cecai-converter never replaces a release asset. Delete the old asset on the release page if the "
            "new file should replace it, or publish to a new tag",
        )
    return kept


def _plan_checksums(
    plan: ReleasePlan,
    remote_sums: Mapping[str, str],
    kept: Mapping[str, str],
    sums_asset: Mapping[str, Any] | None,
    staging: Path,
) -> None:
    """SHA256SUMS: what the release already vouches for, plus this run's files; staged and planned for upload
    when it changed."""
    existing = plan.existing
    sums = {n: d for n, d in remote_sums.items() if n in existing and n != CHECKSUMS_NAME}
    for name, remote in existing.items():
        digest = remote.get("digest")
        ours = name.endswith((".gguf", ".manifest.json"))  # other files on the release are not vouched for
        if ours and name not in sums and isinstance(digest, str) and digest.startswith("sha256:"):
            sums[name] = digest.removeprefix("sha256:")
    sums.update({a.name: a.sha256 for a in plan.assets})
    sums.update(kept)
    plan.sums = {n: d for n, d in sums.items() if not n.endswith(PARTIAL_SUFFIX)}
    sums_path = staging / CHECKSUMS_NAME
    atomic_write_text(sums_path, checksums_text(plan.sums))
    sums_local = LocalAsset(CHECKSUMS_NAME, sums_path, sums_path.stat().st_size, sha256_file(sums_path), "checksums")
    if sums_asset is not None and sums_asset.get("state", "uploaded") != "uploaded":
        plan.stale.append(dict(sums_asset))
        plan.to_upload.append(sums_local)
    elif sums_asset is None or remote_sums != plan.sums:
        plan.to_upload.append(sums_local)
    else:
        plan.unchanged.append(CHECKSUMS_NAME)


def upload_release(
    gh: GitHubClient,
    plan: ReleasePlan,
    *,
    target_commitish: str | None = None,
    retries: int = 2,
    say: Callable[[str], None] = _log.info,
) -> PublishResult:
    """Carry out ``plan``'s uploads: create the draft if there is none, remove leftovers, upload (under temporary
    names where the release is published or a name is replaced), then rename into place.

    Raises:
        PublishFailed: an upload failed; every asset this run uploaded was removed again.
    """
    release = plan.release
    created = release is None
    if release is None:
        say(f"creating a draft release for {plan.tag}")
        release = gh.create_release(plan.tag, body="", target_commitish=target_commitish)
        plan.release = release
    draft = plan.draft
    result = PublishResult(
        tag=plan.tag,
        release_id=int(release["id"]),
        html_url=str(release.get("html_url", "")),
        draft=draft,
        created=created,
        unchanged=plan.unchanged,
        split=plan.split,
    )
    uploaded: list[dict[str, Any]] = []  # this run's assets, removed again if anything fails
    attempted: set[str] = set()
    try:
        for old in plan.stale:
            say(f"removing the leftover of an interrupted upload: {old['name']}")
            gh.delete_asset(int(old["id"]))
        for asset in plan.to_upload:
            # A published release never shows a half-done file: upload under a temporary name, rename at the end.
            # So does SHA256SUMS, which replaces the one already there.
            temp = not draft or asset.name in plan.existing
            name = asset.name + PARTIAL_SUFFIX if temp else asset.name
            say(f"uploading {asset.name} ({decimal_size(asset.size)})")
            attempted.add(name)
            uploaded.append({**_upload_with_retries(gh, release, asset.path, name, retries), "_final": asset.name})
        for item in uploaded:
            if item["name"] != item["_final"]:
                replaced = plan.existing.get(item["_final"])
                if replaced is not None and replaced not in plan.stale:
                    gh.delete_asset(int(replaced["id"]))
                gh.rename_asset(int(item["id"]), item["_final"])
                item["name"] = item["_final"]
    except BaseException as exc:
        removed = _cleanup(gh, result.release_id, uploaded, attempted)
        if isinstance(exc, ConverterError):
            raise PublishFailed(
                f"{exc.message}; removed the {removed} asset(s) this run had uploaded, "
                f"release {plan.tag} left {'a draft' if draft else 'as it was'}",
                hint=(exc.hint + ". " if exc.hint else "") + "Re-run the job: files already there are skipped",
            ) from exc
        raise
    result.uploaded = [a.name for a in plan.to_upload]
    result.replaced = plan.replaced
    for name in plan.replaced:
        say(f"replaced {name}: the check records in it changed")
    return result


def finalize_release(
    gh: GitHubClient,
    plan: ReleasePlan,
    result: PublishResult,
    *,
    publish: bool = True,
    say: Callable[[str], None] = _log.info,
) -> PublishResult:
    """Write the release notes and publish the draft, unless a check failed or ``publish`` is False.

    Raises:
        ChecksFailed: a check failed or is missing; everything was uploaded and the release left a draft.
    """
    release = plan.release
    assert release is not None  # created by upload_release
    final = {a["name"]: a for a in gh.list_assets(result.release_id)}
    precisions = {a.name: a.precision or "" for a in plan.assets}
    rows = [
        (name, int(final[name].get("size", 0)), plan.sums[name], precisions.get(name, ""))
        for name in sorted(final)
        if notes_row(name, plan.sums)
    ]
    all_split: dict[str, list[str]] = {}
    for name in sorted(final):
        if SPLIT_NAME.match(name):
            all_split.setdefault(original_name(name), []).append(name)
    state = "every file was uploaded; the release was left as it was (a draft stays a draft)"
    body = fit_notes(release.get("body"), rows, all_split, plan.manifests, tag=plan.tag, state=state)
    changes: dict[str, Any] = {}
    draft = bool(release.get("draft"))
    if body != (release.get("body") or "") and (draft or not release.get("immutable")):
        changes["body"] = body
    if draft and publish and not plan.failures:
        changes["draft"] = False
    if changes:
        if changes.get("draft") is False:
            say(f"publishing release {plan.tag}")
        updated = gh.update_release(result.release_id, **changes)
        result.draft = bool(updated.get("draft"))
        result.html_url = str(updated.get("html_url", result.html_url))
    if plan.failures:
        state = "left a draft" if result.draft else "already published, left as it was"
        raise ChecksFailed(
            f"release {plan.tag} {state}: " + "; ".join(plan.failures),
            hint="every file was uploaded; fix the failing pair (or relax its limits) and re-run the workflow: "
            "identical files are skipped and the draft is published once every check passes",
            result=result,
        )
    return result


def publish_release(
    inputs: Sequence[Path],
    *,
    repo: str,
    tag: str,
    token: str,
    api_url: str | None = None,
    publish: bool = True,
    size_limit: int = SIZE_LIMIT,
    target_commitish: str | None = None,
    retries: int = 2,
    client: GitHubClient | None = None,
    on_progress: Callable[[str], None] | None = None,
    checks: Sequence[Path] = (),
    expected_checks: Sequence[tuple[str, str]] | None = None,
) -> PublishResult:
    """Attach the conversion outputs in ``inputs`` to the release for ``tag`` (see the module docstring):
    :func:`plan_release`, then :func:`upload_release`, then :func:`finalize_release`.

    With ``checks`` (check records of ``cecai-convert check``, files or folders), each model's manifest is published
    with a record per pair and the notes get a files × pairs table. A failed check, or a pair of
    ``expected_checks`` ((model, pair) pairs) without a record, leaves the release a draft: everything is uploaded,
    nothing is published, and :class:`ChecksFailed` says why.

    Args:
        inputs: conversion output folders and/or ``.gguf`` files (see :func:`collect_assets`).
        repo: ``owner/name``.
        tag: the release's tag.
        token: a GitHub token with ``contents: write``.
        api_url: the REST base URL; default ``GITHUB_API_URL`` or github.com.
        publish: publish the draft at the end; False leaves it a draft for review.
        size_limit: files of this many bytes or more are split; smaller in tests.
        target_commitish: the commit a new release's tag is created at, if the tag does not exist yet.
        retries: extra attempts per upload after a failure.
        client: a ready client (tests).
        on_progress: called with one line per step.
        checks: check records, or folders holding them.
        expected_checks: (model name, pair name) pairs that must each have a record.

    Raises:
        UsageError: bad inputs (see :func:`collect_assets`).
        PublishFailed: a name is taken by a different file, the release is immutable and something is new, or
            GitHub failed; in every case the release is left as it was.
    """
    if not 0 < size_limit <= SIZE_LIMIT:
        raise UsageError(f"the split size must be between 1 and {SIZE_LIMIT} bytes, got {size_limit}")
    say = on_progress or _log.info
    gh = client or GitHubClient(repo, token, api_url=api_url)
    with tempfile.TemporaryDirectory(prefix="cecai-publish-") as tmp:
        plan = plan_release(
            gh,
            inputs,
            tag=tag,
            staging=Path(tmp),
            size_limit=size_limit,
            checks=checks,
            expected_checks=expected_checks,
            say=say,
        )
        result = upload_release(gh, plan, target_commitish=target_commitish, retries=retries, say=say)
        return finalize_release(gh, plan, result, publish=publish, say=say)


def draft_or_mutable(release: Mapping[str, Any]) -> bool:
    """Whether the release still accepts replaced assets: a draft, or a published release that is not immutable."""
    return bool(release.get("draft")) or not release.get("immutable")


def _same_manifest(remote: bytes, local: Path) -> bool:
    """Whether the release's copy of a manifest and ours differ only in run-to-run fields (:func:`stable_view`).

    Compared as JSON, not as :class:`Manifest`: the release's copy may come from another version of this tool.
    """
    try:  # the release's copy comes from the network: bounded, like every JSON someone else wrote
        theirs = loads_bounded(remote, what="the release's manifest", allow_nan=True, max_bytes=64 * 1024 * 1024)
        ours = json.loads(local.read_text(encoding="utf-8"))
    except (ConverterError, ValueError, UnicodeDecodeError):
        return False
    return bool(stable_view(theirs) == stable_view(ours))


def _upload_with_retries(
    gh: GitHubClient, release: Mapping[str, Any], path: Path, name: str, retries: int
) -> dict[str, Any]:
    for attempt in range(retries + 1):
        try:
            return gh.upload_asset(release, path, name)
        except GitHubAPIError as exc:
            if attempt == retries or exc.status in (401, 403, 404, 422):
                raise
            _log.warning(f"warning: uploading {name} failed ({exc.message}); retrying")
            time.sleep(min(2**attempt, 10))
            # GitHub keeps a failed upload as an asset in state "starter": remove it before trying again.
            for asset in gh.list_assets(int(release["id"])):
                if asset.get("name") == name:
                    gh.delete_asset(int(asset["id"]))
    raise AssertionError("unreachable")  # pragma: no cover


def _cleanup(gh: GitHubClient, release_id: int, uploaded: list[dict[str, Any]], attempted: set[str]) -> int:
    """Best effort: remove this run's uploads and what a failed upload left behind; returns how many were removed."""
    removed = 0
    try:
        for asset in uploaded:
            gh.delete_asset(int(asset["id"]))
            removed += 1
        done = {int(a["id"]) for a in uploaded}
        for asset in gh.list_assets(release_id):
            if asset.get("name") in attempted and int(asset["id"]) not in done:
                gh.delete_asset(int(asset["id"]))
    except ConverterError as exc:  # the original failure matters more
        _log.warning(f"warning: could not remove every partial upload: {exc.message}")
    return removed
