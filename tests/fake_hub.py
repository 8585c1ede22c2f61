"""A fake Hugging Face Hub on 127.0.0.1: just enough of the API for huggingface_hub's upload_folder.

Endpoints (what huggingface_hub 2.4 calls for create_repo, create_branch and upload_folder):
    POST /api/repos/create                          create a repo (409 if it exists)
    GET  /api/models/{repo}[/revision/{rev}]        repo info (create_repo's 401/403 fallback, no-op uploads)
    POST /api/models/{repo}/branch/{branch}         create a branch from main (409 if it exists)
    POST /api/validate-yaml                         README.md metadata check before hashing
    POST /api/models/{repo}/preupload/{rev}         upload mode per file: always "regular"
    POST /api/models/{repo}/commit/{rev}            NDJSON commit, regular files inline as base64

Answering "regular" for every file keeps the client off Xet and LFS: with hf_xet installed,
upload_folder sends every non-regular file through Xet storage, which this fake does not speak.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO_ROUTE = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<op>preupload|commit|branch|revision)/(?P<ref>[^/]+))?$"
)


@dataclass
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes


class FakeHub:
    """A threaded HTTP server acting as the Hub; use as a context manager.

    Args:
        token: The only token accepted; any other (or none) gets 401. None accepts every request.
    """

    def __init__(self, token: str | None = None):
        self.token = token
        self.requests: list[Request] = []
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.unknown: list[str] = []  # "METHOD path" of requests no route answered
        self._failures: list[list] = []  # [path substring, status, times left]
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, path_contains: str, status: int = 503, times: int = 1) -> None:
        """Answer the next ``times`` requests whose path contains ``path_contains`` with ``status``."""
        self._failures.append([path_contains, status, times])

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> None:
        self.repos[repo_id] = {"private": private, "branches": {"main": dict(files or {})}}

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files the repo holds on ``revision``: path -> bytes."""
        return self.repos[repo_id]["branches"][revision]

    def token_leaks(self, token: str) -> list[str]:
        """Where ``token`` was sent other than as ``Authorization: Bearer <token>``."""
        leaks = []
        for r in self.requests:
            if token in r.path:
                leaks.append(f"{r.method} {r.path}: URL")
            if token.encode() in r.body:
                leaks.append(f"{r.method} {r.path}: body")
            for name, value in r.headers.items():
                if token in value and not (name == "authorization" and value == f"Bearer {token}"):
                    leaks.append(f"{r.method} {r.path}: header {name}")
        return leaks

    def paths(self, method: str | None = None) -> list[str]:
        return [urlsplit(r.path).path for r in self.requests if method in (None, r.method)]

    # --- request handling (server threads) ---------------------------------------------

    def _handle(self, request: Request) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers) for one request."""
        with self._lock:
            self.requests.append(request)
            for failure in self._failures:
                if failure[0] in request.path and failure[2] > 0:
                    failure[2] -= 1
                    return failure[1], {"error": "injected failure"}, {}
            if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
                headers = {"X-Error-Message": "Invalid credentials in Authorization header"}
                return 401, {"error": "Invalid credentials"}, headers
            return self._route(request)

    def _route(self, request: Request) -> tuple[int, dict, dict]:
        path = urlsplit(request.path).path
        body = request.body
        if request.method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
            self.add_repo(repo_id, private=payload.get("visibility") == "private")
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}
        if request.method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        match = _REPO_ROUTE.match(path)
        if not match:
            self.unknown.append(f"{request.method} {request.path}")
            return 404, {"error": "no such route in FakeHub"}, {}
        repo_id, op, ref = match["repo"], match["op"], unquote(match["ref"] or "main")
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        branches = self.repos[repo_id]["branches"]
        if op == "branch":
            if ref in branches:
                return 409, {"error": "Reference already exists"}, {}
            branches[ref] = dict(branches["main"])
            return 200, {}, {}
        if ref not in branches:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        if request.method == "GET" and op in (None, "revision"):
            siblings = [{"rfilename": p} for p in branches[ref]]
            return 200, {"id": repo_id, "sha": _sha(repr(sorted(branches[ref]))), "private": self.repos[repo_id]["private"],
                         "siblings": siblings}, {}
        if op == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}, {}
        if op == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            for line in lines:
                if line["key"] == "file":
                    branches[ref][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] == "deletedFile":
                    branches[ref].pop(line["value"]["path"], None)
                elif line["key"] != "header":
                    return 400, {"error": f"FakeHub cannot commit {line['key']}"}, {}
            oid = _sha(body)
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}, {}
        self.unknown.append(f"{request.method} {request.path}")
        return 405, {"error": "method not allowed in FakeHub"}, {}


def _sha(data: str | bytes) -> str:
    return hashlib.sha1(data.encode() if isinstance(data, str) else data).hexdigest()


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while size := int(self.rfile.readline().strip() or b"0", 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            status, payload, headers = hub._handle(request)
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format, *args) -> None:  # keep test output clean
            pass

    return Handler
