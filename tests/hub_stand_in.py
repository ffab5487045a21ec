"""HubStandIn: a local stand-in for the part of the Hugging Face Hub API that ``fetch_from_hub`` uses.

The Hub is not reachable from the test machines; huggingface_hub honours ``HF_ENDPOINT``, so this server answers
the calls that ``HfApi.model_info`` and ``snapshot_download(revision=<sha>, allow_patterns=…, local_dir=…)`` make
with the installed huggingface_hub (2.x, on its ``httpx2`` client), with the same shapes:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: ``id``, ``sha`` (40 hex), ``private``,
  ``gated``, ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}?recursive=…``: the file listing ``snapshot_download`` filters with
  ``allow_patterns`` (``type``, ``path``, ``size``, ``oid``, ``lfs`` for weight files), one page, no ``Link``;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{filename}``: ``X-Repo-Commit``, ``ETag`` (the git blob id) or, for LFS
  files, ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``; ``Content-Length``; ``Range: bytes=N-`` → 206. No
  ``X-Xet-*`` headers, so the client uses plain HTTP downloads;
- errors as the Hub sends them, with the ``X-Error-Code`` header huggingface_hub maps to its exception classes:
  an unknown or private repo without a valid token → 401 ``RepoNotFound`` (the Hub does not reveal that a private
  repo exists); an unknown revision → 404 ``RevisionNotFound``; an unknown file → 404 ``EntryNotFound``; a gated
  repo's files without a granted token → 401 (no token) or 403 (token not granted) ``GatedRepo`` (its metadata
  and listing stay public, as on the Hub);
- ``GET /api/agent-harnesses`` (huggingface_hub 2.x fetches it, unauthenticated, for its user-agent): empty.

huggingface_hub sends the token as ``authorization: Bearer <token>``; every request is recorded in ``requests``
so tests can check what was asked for and with which credentials.

Failure injection (``fail_downloads``: filename → mode), applied to ``GET`` of that file only (``HEAD`` answers, so
the client commits to the download first): ``"500"`` answers 500; ``"go-away"`` sends the headers and a third of
the body and drops the connection; from then on that file's requests (the client's resume attempts) are dropped
unanswered, and as soon as the other downloads in flight have finished the whole server goes away (listener
closed), so the client's last attempts fail with "connection refused". Waiting for the others keeps the outcome
deterministic: a file whose metadata request met a closed port would be retried with huggingface_hub's long
back-off instead.

It is a stand-in, not the Hub: behaviour not listed here is not modelled (no xet, no redirects to a CDN, no
pagination, no datasets or spaces).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["HubRepo", "HubStandIn", "Request"]

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".model", ".msgpack", ".onnx", ".h5")


@dataclass(frozen=True)
class Request:
    """One request the stand-in received."""

    method: str
    path: str
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == "authorization"), None)


@dataclass
class HubRepo:
    """A model repository: its files at one commit, the refs that point there, and who may read it."""

    repo_id: str
    files: dict[str, bytes]
    sha: str
    refs: dict[str, str]
    private: bool = False
    gated: bool = False
    tokens: set[str] = field(default_factory=set)  # may read a private repo / were granted a gated one

    def blob_id(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(_LFS_SUFFIXES)


class HubStandIn:
    """Serve on 127.0.0.1 on a free port; use as a context manager.

    Attributes:
        endpoint: the base URL to pass as ``HF_ENDPOINT``.
        repos: repo id → :class:`HubRepo`.
        requests: every request received, in order.
        fail_downloads: filename → ``"500"`` or ``"go-away"`` (see the module docstring).
        gone: set once the server went away (``go-away`` injection).
    """

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self.fail_downloads: dict[str, str] = {}
        self.gone = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._closed = False
        self._in_flight = 0
        self._last_start = time.monotonic()

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._server.server_close()

    def go_away(self) -> None:
        """Stop serving and close the listening socket (from any thread, a handler's included)."""
        self.gone.set()
        threading.Thread(target=self._close, daemon=True).start()

    def _go_away_when_quiet(self, quiet_s: float = 0.3, limit_s: float = 10.0) -> None:
        """Go away once no other request is in flight and none has started for ``quiet_s`` (at most ``limit_s``)."""

        def wait() -> None:
            deadline = time.monotonic() + limit_s
            while time.monotonic() < deadline:
                with self._lock:
                    if self._in_flight == 0 and time.monotonic() - self._last_start >= quiet_s:
                        break
                time.sleep(0.05)
            self.go_away()

        threading.Thread(target=wait, daemon=True).start()

    def _started(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            if delta > 0:
                self._last_start = time.monotonic()

    # ------------------------------------------------------------------ helpers for tests
    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        extra_files: dict[str, bytes] | None = None,
        branches: tuple[str, ...] = ("main",),
        private: bool = False,
        gated: bool = False,
        tokens: tuple[str, ...] = (),
    ) -> HubRepo:
        """Publish every file under ``folder`` (plus ``extra_files``) as one commit of ``repo_id``."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update(extra_files or {})
        digest = hashlib.sha1(repo_id.encode(), usedforsecurity=False)
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        repo = HubRepo(repo_id, files, sha, dict.fromkeys(branches, sha), private, gated, set(tokens))
        self.repos[repo_id] = repo
        return repo

    def resolve_requests(self, method: str = "GET") -> list[str]:
        """The file names requested through ``/{repo}/resolve/…`` with ``method``."""
        names = []
        for r in self.requests:
            m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", urllib.parse.urlsplit(r.path).path)
            if m and r.method == method:
                names.append(urllib.parse.unquote(m[1]))
        return names

    # ------------------------------------------------------------------ the HTTP side
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _send(
                self, status: int, body: Any = None, headers: dict[str, str] | None = None, *, head: bool = False
            ) -> None:
                raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
                self.send_response(status)
                ctype = "application/octet-stream" if isinstance(body, bytes) else "application/json; charset=utf-8"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(raw)

            def _error(self, status: int, code: str, message: str, *, head: bool = False) -> None:
                headers = {"X-Error-Code": code, "X-Error-Message": message}
                self._send(status, {"error": message}, headers, head=head)

            def _token(self) -> str | None:
                auth = self.headers.get("Authorization") or ""
                return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

            def _repo(self, repo_id: str, *, head: bool = False) -> HubRepo | None:
                """The repo when it exists and the caller may see it; else the Hub's 401 answer is sent."""
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and self._token() not in repo.tokens):
                    self._error(401, "RepoNotFound", "Repository not found", head=head)
                    return None
                return repo

            def _commit(self, repo: HubRepo, revision: str, *, head: bool = False) -> str | None:
                revision = urllib.parse.unquote(revision)
                if revision == repo.sha or revision in repo.refs:
                    return repo.refs.get(revision, repo.sha)
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
                return None

            def _route(self, method: str) -> None:
                hub.requests.append(Request(method, self.path, dict(self.headers)))
                path = urllib.parse.urlsplit(self.path).path
                m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", path)
                if m and hub.fail_downloads.get(urllib.parse.unquote(m[1])) == "going-away":
                    self.close_connection = True  # drop it unanswered: the server is on its way out
                    return
                hub._started(+1)
                try:
                    self._dispatch(method, path)
                finally:
                    hub._started(-1)

            def _dispatch(self, method: str, path: str) -> None:
                head = method == "HEAD"
                if path == "/api/agent-harnesses" and method == "GET":  # huggingface_hub 2.x's user-agent lookup
                    return self._send(200, {"standardEnvVars": [], "harnesses": {}})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m and method == "GET":
                    return self._model_info(urllib.parse.unquote(m[1]), m[2] or "main")
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
                if m and method == "GET":
                    return self._tree(urllib.parse.unquote(m[1]), m[2])
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m and method in ("GET", "HEAD"):
                    return self._resolve(urllib.parse.unquote(m[1]), m[2], urllib.parse.unquote(m[3]), head=head)
                return self._send(404, {"error": "Sorry, we can't find the page you are looking for."}, head=head)

            def _model_info(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                sha = self._commit(repo, revision)
                if sha is None:
                    return
                self._send(
                    200,
                    {
                        "_id": hashlib.md5(repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
                        "id": repo_id,
                        "modelId": repo_id,
                        "author": repo_id.split("/")[0],
                        "sha": sha,
                        "private": repo.private,
                        "gated": "manual" if repo.gated else False,
                        "disabled": False,
                        "lastModified": "2024-01-01T00:00:00.000Z",
                        "tags": ["safetensors"],
                        "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                    },
                )

            def _tree(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id)
                if repo is None or self._commit(repo, revision) is None:
                    return
                entries: list[dict[str, Any]] = []
                folders = sorted({p.rsplit("/", 1)[0] for p in repo.files if "/" in p})
                for folder in folders:
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
                for name in sorted(repo.files):
                    data = repo.files[name]
                    entry: dict[str, Any] = {"type": "file", "oid": repo.blob_id(name), "size": len(data), "path": name}
                    if repo.is_lfs(name):
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    entries.append(entry)
                self._send(200, entries)

            def _resolve(self, repo_id: str, revision: str, filename: str, *, head: bool) -> None:
                repo = self._repo(repo_id, head=head)
                if repo is None:
                    return
                sha = self._commit(repo, revision, head=head)
                if sha is None:
                    return
                if repo.gated and self._token() not in repo.tokens:
                    message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in."  # noqa: E501
                    return self._error(403 if self._token() else 401, "GatedRepo", message, head=head)
                data = repo.files.get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", "Entry not found", head=head)
                headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "ETag": f'"{repo.blob_id(filename)}"'}
                if repo.is_lfs(filename):
                    headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                    headers["X-Linked-Size"] = str(len(data))
                if head:
                    return self._send(200, data, headers, head=True)
                failure = hub.fail_downloads.get(filename)
                if failure == "500":
                    return self._error(500, "InternalServerError", "Internal Error - We're working hard to fix this")
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and int(m[1]) < len(data):
                    start = int(m[1])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if failure == "go-away":
                    self.send_response(206 if start else 200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    hub.fail_downloads[filename] = "going-away"
                    hub._go_away_when_quiet()
                    return
                self._send(206 if start else 200, body, headers)

            def do_GET(self) -> None:
                self._route("GET")

            def do_HEAD(self) -> None:
                self._route("HEAD")

            def do_POST(self) -> None:
                self._route("POST")

        return Handler
