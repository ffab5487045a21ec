"""FakeGitHubServer: a local stand-in for the part of GitHub's REST API that publishing uses.

GitHub is not reachable from the test machines, so this server answers the same calls with the same shapes:
releases (list, by tag, create, update), assets (list, upload, delete, rename, download through a redirect to a
"storage" path that rejects the Authorization header, as GitHub's storage does). It models what matters for
correctness: drafts are not returned by the by-tag endpoint; published *immutable* releases refuse uploads; an
upload that fails leaves an asset in state ``starter``; assets carry ``digest: sha256:…``. It is a stand-in, not
GitHub: behaviour not listed here is not modelled.

GitHub's rules learnt by use, modelled too: an asset name keeps ASCII letters, digits, ``.``, ``_``, ``-`` and ``+``,
every other character becomes ``.`` (:func:`github_asset_name`; spaces, ``~``, ``:``, ``(``, non-ASCII letters),
silently; a release body longer than :data:`BODY_LIMIT` characters is refused with 422 (create and update).

Failure injection: ``fail_uploads`` holds asset names whose upload fails with HTTP 502 (after the body is read).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["BODY_LIMIT", "FakeGitHubServer", "github_asset_name"]

#: GitHub's limit on a release description, in characters.
BODY_LIMIT = 125_000


def github_asset_name(name: str) -> str:
    """The name GitHub gives an uploaded asset: characters other than ASCII letters, digits, ``._-+`` become ``.``."""
    return re.sub(r"[^A-Za-z0-9._+-]", ".", name)


def _body_too_long() -> dict[str, Any]:
    message = f"body is too long (maximum is {BODY_LIMIT} characters)"
    return {"message": "Validation Failed", "errors": [{"resource": "Release", "field": "body", "message": message}]}


class FakeGitHubServer:
    """Serve on 127.0.0.1 on a free port; use as a context manager.

    Attributes:
        api_url: the base URL to pass as GITHUB_API_URL.
        releases: id -> release dict (as the API returns it).
        assets: id -> asset dict, with a private ``_data`` and ``_release`` key.
        requests: (method, path, headers) of every request, for assertions.
        fail_uploads: asset names whose next uploads fail with 502.
        immutable_releases: releases become immutable when published (like a repo with immutable releases on).
    """

    def __init__(self, repo: str = "octo/models", token: str = "ghs_test_token", *, immutable_releases: bool = True):  # noqa: S107 (a test token)
        self.repo = repo
        self.token = token
        self.immutable_releases = immutable_releases
        self.releases: dict[int, dict[str, Any]] = {}
        self.assets: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.fail_uploads: set[str] = set()
        self._next_id = 100
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.api_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeGitHubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ helpers for tests
    def new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def add_release(self, tag: str, *, draft: bool, body: str = "", immutable: bool | None = None) -> dict[str, Any]:
        rid = self.new_id()
        release = {
            "id": rid,
            "tag_name": tag,
            "name": tag,
            "body": body,
            "draft": draft,
            "immutable": (not draft and self.immutable_releases) if immutable is None else immutable,
            "html_url": f"https://github.invalid/{self.repo}/releases/tag/{tag}",
            "upload_url": f"{self.api_url}/uploads/repos/{self.repo}/releases/{rid}/assets{{?name,label}}",
        }
        self.releases[rid] = release
        return release

    def add_asset(self, release_id: int, name: str, data: bytes, *, state: str = "uploaded") -> dict[str, Any]:
        aid = self.new_id()
        asset = {
            "id": aid,
            "name": name,
            "size": len(data),
            "state": state,
            "digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
            "_data": data,
            "_release": release_id,
        }
        self.assets[aid] = asset
        return asset

    def asset_names(self, release_id: int) -> list[str]:
        return sorted(a["name"] for a in self.assets.values() if a["_release"] == release_id)

    def asset_data(self, release_id: int, name: str) -> bytes:
        return next(a["_data"] for a in self.assets.values() if a["_release"] == release_id and a["name"] == name)

    def release_by_tag(self, tag: str) -> dict[str, Any]:
        return next(r for r in self.releases.values() if r["tag_name"] == tag)

    @staticmethod
    def public(asset: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in asset.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ the HTTP side
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
                raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
                self.send_response(status)
                ctype = "application/octet-stream" if isinstance(body, bytes) else "application/json; charset=utf-8"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _route(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                fake.requests.append((method, self.path, dict(self.headers)))
                path = url.path
                if path.startswith("/storage/"):  # like S3: a signed URL, and no Authorization header allowed
                    if self.headers.get("Authorization"):
                        return self._send(400, {"message": "Only one auth mechanism allowed"})
                    asset = fake.assets.get(int(path.rsplit("/", 1)[1]))
                    return self._send(200, asset["_data"]) if asset else self._send(404, {"message": "Not Found"})
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._body()
                    return self._send(401, {"message": "Bad credentials"})
                prefix = f"/repos/{fake.repo}"
                upload_prefix = f"/uploads/repos/{fake.repo}/releases/"
                if path.startswith(upload_prefix) and method == "POST":
                    name = github_asset_name(query.get("name", ""))
                    return self._upload(int(path[len(upload_prefix) :].split("/")[0]), name)
                if not path.startswith(prefix):
                    return self._send(404, {"message": "Not Found"})
                rest = path[len(prefix) :]
                page, per_page = int(query.get("page", 1)), int(query.get("per_page", 30))

                def paged(items: list[Any]) -> None:
                    self._send(200, items[(page - 1) * per_page : page * per_page])

                if rest == "/releases" and method == "GET":
                    return paged(sorted(fake.releases.values(), key=lambda r: -r["id"]))
                if rest == "/releases" and method == "POST":
                    data = json.loads(self._body())
                    if len(data.get("body") or "") > BODY_LIMIT:
                        return self._send(422, _body_too_long())
                    release = fake.add_release(
                        data["tag_name"], draft=bool(data.get("draft")), body=data.get("body", "")
                    )
                    return self._send(201, release)
                m = re.fullmatch(r"/releases/tags/(.+)", rest)
                if m and method == "GET":
                    tag = urllib.parse.unquote(m[1])
                    found = [r for r in fake.releases.values() if r["tag_name"] == tag and not r["draft"]]
                    return self._send(200, found[0]) if found else self._send(404, {"message": "Not Found"})
                m = re.fullmatch(r"/releases/(\d+)", rest)
                if m and method == "PATCH":
                    release = fake.releases[int(m[1])]
                    data = json.loads(self._body())
                    if len(data.get("body") or "") > BODY_LIMIT:
                        return self._send(422, _body_too_long())
                    if "body" in data:
                        release["body"] = data["body"]
                    if data.get("draft") is False and release["draft"]:
                        release["draft"] = False
                        release["immutable"] = fake.immutable_releases
                    return self._send(200, release)
                m = re.fullmatch(r"/releases/(\d+)/assets", rest)
                if m and method == "GET":
                    rid = int(m[1])
                    return paged(
                        [
                            fake.public(a)
                            for a in sorted(fake.assets.values(), key=lambda a: a["id"])
                            if a["_release"] == rid
                        ]
                    )
                m = re.fullmatch(r"/releases/assets/(\d+)", rest)
                if m:
                    asset = fake.assets.get(int(m[1]))
                    if asset is None:
                        self._body()
                        return self._send(404, {"message": "Not Found"})
                    release = fake.releases[asset["_release"]]
                    if method == "GET":
                        if self.headers.get("Accept") == "application/octet-stream":
                            return self._send(302, None, {"Location": f"{fake.api_url}/storage/{asset['id']}"})
                        return self._send(200, fake.public(asset))
                    if release["immutable"] and not release["draft"]:
                        self._body()
                        return self._send(422, {"message": "Cannot modify an asset of an immutable release"})
                    if method == "DELETE":
                        del fake.assets[asset["id"]]
                        return self._send(204)
                    if method == "PATCH":
                        data = json.loads(self._body())
                        data["name"] = github_asset_name(data["name"])
                        if any(
                            a["name"] == data["name"] and a["_release"] == asset["_release"]
                            for a in fake.assets.values()
                        ):
                            return self._send(
                                422, {"message": "Validation Failed", "errors": [{"code": "already_exists"}]}
                            )
                        asset["name"] = data["name"]
                        return self._send(200, fake.public(asset))
                self._body()
                return self._send(404, {"message": "Not Found"})

            def _upload(self, release_id: int, name: str) -> None:
                data = self._body()
                release = fake.releases.get(release_id)
                if release is None:
                    return self._send(404, {"message": "Not Found"})
                if release["immutable"] and not release["draft"]:
                    return self._send(422, {"message": "Cannot upload assets to an immutable release"})
                if any(a["name"] == name and a["_release"] == release_id for a in fake.assets.values()):
                    return self._send(422, {"message": "Validation Failed", "errors": [{"code": "already_exists"}]})
                if name in fake.fail_uploads:
                    fake.add_asset(release_id, name, data[: len(data) // 2], state="starter")
                    return self._send(502, {"message": "Bad Gateway"})
                asset = fake.add_asset(release_id, name, data)
                return self._send(201, fake.public(asset))

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PATCH(self) -> None:
                self._route("PATCH")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler
