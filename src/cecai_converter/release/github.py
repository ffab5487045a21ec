"""The part of GitHub's REST API that publishing needs (:class:`GitHubClient`: releases and their assets).

The calls use ``urllib`` against ``GITHUB_API_URL`` (``https://api.github.com`` by default) with the token from
``GITHUB_TOKEN``; the token is sent only in the ``Authorization`` header to that API and its upload host, and is
never logged or put in a message. Redirects are followed by hand, without the token. An error status becomes a
:class:`GitHubAPIError` with GitHub's own message and a hint; every JSON answer is read with the bounded reader.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..errors import ConverterError, GitHubAPIError, UsageError
from ..output import get_logger
from ..untrusted_json import loads_bounded

__all__ = ["GitHubClient"]

_log = get_logger("publish")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by hand, without the Authorization header (asset downloads go to another host)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_HINTS: Final[Mapping[int, str]] = {
    401: "the token was refused: pass `github-token` (default: the workflow's GITHUB_TOKEN) or set GITHUB_TOKEN",
    403: "the token may not write releases: give the job `permissions: contents: write`",
    404: "check the repository name and that the token can see it (GITHUB_REPOSITORY, --repo)",
}


def _json_object(value: object) -> dict[str, Any]:
    """A REST answer that must be a JSON object (a release, an asset)."""
    if not isinstance(value, dict):
        raise GitHubAPIError(f"GitHub answered with {type(value).__name__}, not a JSON object", status=0)
    return value


def _refusal(method: str, url: str, exc: urllib.error.HTTPError) -> GitHubAPIError:
    """An error status as a :class:`GitHubAPIError`: the call (path only), GitHub's own message and a hint."""
    raw = exc.read() or b""
    try:
        detail = str(loads_bounded(raw, what="GitHub's error", allow_nan=True).get("message", ""))[:500]
    except (ConverterError, AttributeError):
        detail = raw[:200].decode(errors="replace")
    path = urllib.parse.urlsplit(url).path
    return GitHubAPIError(
        f"GitHub refused {method} {path}: HTTP {exc.code} {detail}".rstrip(), status=exc.code, hint=_HINTS.get(exc.code)
    )


class GitHubClient:
    """The part of GitHub's REST API that publishing needs.

    Args:
        repo: ``owner/name``.
        token: a token with ``contents: write``; sent only in the ``Authorization`` header.
        api_url: the REST base URL (``GITHUB_API_URL``; ``https://api.github.com`` on github.com).
        timeout: seconds to wait on a socket.
    """

    def __init__(self, repo: str, token: str, *, api_url: str | None = None, timeout: float = 600.0) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", repo or ""):
            raise UsageError(f"not a repository name: {repo!r}", hint="write it as owner/name")
        if not token:
            raise UsageError(
                "GITHUB_TOKEN is not set",
                hint="in a workflow, pass `env: GITHUB_TOKEN: ${{ github.token }}` and `permissions: contents: write`",
            )
        self.repo = repo
        self._token = token
        self.api_url = (api_url or os.environ.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirect())

    def __repr__(self) -> str:  # keeps the token out of tracebacks and logs
        return f"GitHubClient(repo={self.repo!r}, api_url={self.api_url!r})"

    def _headers(self, accept: str = "application/vnd.github+json") -> dict[str, str]:
        return {
            "Accept": accept,
            "Authorization": f"Bearer {self._token}",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "cecai-converter",
        }

    def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        accept: str = "application/vnd.github+json",
    ) -> tuple[int, Any, Mapping[str, str]]:
        """One call; returns (status, parsed JSON or raw bytes, headers). Error statuses raise GitHubAPIError."""
        if not url.startswith(("http://", "https://")):
            url = f"{self.api_url}{url}"
        all_headers = self._headers(accept)
        if json_body is not None:
            data = json.dumps(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        req = urllib.request.Request(url, data=data, method=method, headers=all_headers)  # noqa: S310 (http(s) only)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                status, raw, resp_headers = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308):
                return exc.code, b"", dict(exc.headers)
            raise _refusal(method, url, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise GitHubAPIError(
                f"cannot reach {urllib.parse.urlsplit(url).netloc}: {reason}",
                status=0,
                hint="check the network and GITHUB_API_URL",
            ) from None
        if "json" in resp_headers.get("Content-Type", "") and raw:
            what = f"GitHub's answer to {method} {urllib.parse.urlsplit(url).path}"
            try:  # another machine's JSON: bounded (a deep one would end in a RecursionError traceback)
                return status, loads_bounded(raw, what=what, allow_nan=True, max_bytes=256 * 1024 * 1024), resp_headers
            except UsageError as exc:
                raise GitHubAPIError(exc.message, status=status, hint="GitHub's API answered with bad JSON") from None
        return status, raw, resp_headers

    def _paged(self, path: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for page in range(1, 101):
            sep = "&" if "?" in path else "?"
            _, batch, _ = self.request("GET", f"{path}{sep}per_page=100&page={page}")
            items.extend(batch or [])
            if len(batch or []) < 100:
                break
        return items

    def find_release(self, tag: str) -> dict[str, Any] | None:
        """The release for ``tag``: a published one (by tag), else the newest draft with that tag, else None."""
        quoted = urllib.parse.quote(tag, safe="")
        try:
            _, release, _ = self.request("GET", f"/repos/{self.repo}/releases/tags/{quoted}")
            return _json_object(release)
        except GitHubAPIError as exc:
            if exc.status != 404:
                raise
        drafts = [r for r in self._paged(f"/repos/{self.repo}/releases") if r.get("tag_name") == tag]
        if len(drafts) > 1:
            _log.warning(f"warning: {len(drafts)} draft releases use tag {tag}; using release {drafts[0]['id']}")
        return drafts[0] if drafts else None

    def create_release(self, tag: str, *, body: str, target_commitish: str | None = None) -> dict[str, Any]:
        """A new draft release for ``tag``."""
        payload: dict[str, Any] = {"tag_name": tag, "name": tag, "body": body, "draft": True}
        if target_commitish:
            payload["target_commitish"] = target_commitish
        _, release, _ = self.request("POST", f"/repos/{self.repo}/releases", json_body=payload)
        return _json_object(release)

    def update_release(self, release_id: int, **fields: Any) -> dict[str, Any]:
        """PATCH a release (``body``, ``draft``...)."""
        _, release, _ = self.request("PATCH", f"/repos/{self.repo}/releases/{release_id}", json_body=fields)
        return _json_object(release)

    def list_assets(self, release_id: int) -> list[dict[str, Any]]:
        """Every asset of a release."""
        return self._paged(f"/repos/{self.repo}/releases/{release_id}/assets")

    def upload_asset(self, release: Mapping[str, Any], path: Path, name: str) -> dict[str, Any]:
        """Stream ``path`` to the release's upload URL as ``name``."""
        base = str(release["upload_url"]).split("{", 1)[0]
        url = f"{base}?{urllib.parse.urlencode({'name': name})}"
        size = path.stat().st_size
        with path.open("rb") as fh:
            _, asset, _ = self.request(
                "POST",
                url,
                data=fh,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
        return _json_object(asset)

    def delete_asset(self, asset_id: int) -> None:
        """Remove an asset."""
        self.request("DELETE", f"/repos/{self.repo}/releases/assets/{asset_id}")

    def rename_asset(self, asset_id: int, name: str) -> dict[str, Any]:
        """Give an asset its final name."""
        _, asset, _ = self.request("PATCH", f"/repos/{self.repo}/releases/assets/{asset_id}", json_body={"name": name})
        return _json_object(asset)

    def download_asset(self, asset_id: int) -> bytes:
        """An asset's bytes. GitHub answers with a redirect to storage, which is fetched without the token."""
        status, body, headers = self.request(
            "GET", f"/repos/{self.repo}/releases/assets/{asset_id}", accept="application/octet-stream"
        )
        if status in (301, 302, 303, 307, 308):
            location = headers.get("Location") or headers.get("location") or ""
            if not location.startswith(("http://", "https://")):
                raise GitHubAPIError(f"asset {asset_id}: redirect without a usable location", status=status)
            req = urllib.request.Request(location, headers={"User-Agent": "cecai-converter"})  # noqa: S310
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http(s) checked)
                    return bytes(resp.read())
            except (urllib.error.URLError, OSError) as exc:
                raise GitHubAPIError(f"cannot download asset {asset_id}: {exc}", status=0) from None
        return bytes(body)
