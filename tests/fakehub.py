"""A tiny in-memory Hugging Face Hub on 127.0.0.1 for offline tests of the real ``huggingface_hub`` client.

It implements the HTTP endpoints that ``HfApi.create_repo``, ``create_branch``, ``upload_folder``
(preupload + NDJSON commit, regular uploads only) and ``snapshot_download``/``hf_hub_download``
(repo info, tree listing, resolve HEAD/GET) call in huggingface_hub 2.x, with the error headers the
client maps to its exception classes.  The server runs in a daemon thread, only for the duration of
a ``with`` block, and shuts itself down after ``max_seconds`` in any case.

Also :func:`seed_cache`, which writes a snapshot in the cache layout huggingface_hub itself uses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def seed_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, sha: str,
               refs: tuple[str, ...] = ("main",)) -> Path:
    """Write ``models--org--name/{blobs,snapshots/<sha>,refs/<ref>}`` as huggingface_hub does."""
    root = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    for rel, data in files.items():
        blob = root / "blobs" / git_sha1(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / sha / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(sha)  # no newline, like huggingface_hub
    return root / "snapshots" / sha


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def commit(self, parent: str | None, files: dict[str, bytes], message: str) -> str:
        tree = dict(self.commits.get(parent, {})) if parent else {}
        tree.update(files)
        sha = hashlib.sha1(json.dumps([parent, message, sorted((k, git_sha1(v)) for k, v in tree.items())])
                           .encode()).hexdigest()
        self.commits[sha] = tree
        return sha


class FakeHub:
    """``with FakeHub(token="hf_x") as hub:`` then ``HF_ENDPOINT=hub.url``; ``hub.repos`` holds the state."""

    def __init__(self, token: str | None = None, max_seconds: float = 60.0) -> None:
        self.token = token
        self.max_seconds = max_seconds
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict[str, Any]] = []
        self.create_payloads: list[dict[str, Any]] = []
        self.commit_headers: list[dict[str, Any]] = []

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(self.max_seconds, self.server.shutdown)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # -- helpers ----------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False, private: bool = False,
                 tags: tuple[str, ...] = ()) -> str:
        repo = self.repos.setdefault(repo_id, Repo(private=private, gated=gated))
        sha = repo.commit(repo.branches.get("main"), files, "seed")
        repo.branches["main"] = sha
        for t in tags:
            repo.branches[t] = sha
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[revision]]

    def _send(self, h: BaseHTTPRequestHandler, code: int, body: Any = None, headers: dict[str, str] | None = None,
              method: str = "GET") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(data)

    def _authorised(self, h: BaseHTTPRequestHandler) -> bool:
        return self.token is None or h.headers.get("authorization") == f"Bearer {self.token}"

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        self.requests.append({"method": method, "path": url.path, "headers": dict(h.headers), "body": body})
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            self._route(h, method, parts, body)
        except KeyError as e:
            self._send(h, 404, {"error": f"not found: {e}"}, {"X-Error-Code": "RepoNotFound"}, method)

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str, method: str, write: bool = False) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorised(h)):
            self._send(h, 404 if self._authorised(h) else 401, {"error": "Repository not found"},
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, method)
            return None
        if repo.gated and not self._authorised(h):
            self._send(h, 403, {"error": "gated"}, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"}, method)
            return None
        if write and not self._authorised(h):
            self._send(h, 401, {"error": "Invalid credentials"}, None, method)
            return None
        return repo

    def _sha(self, h: BaseHTTPRequestHandler, repo: Repo, rev: str, method: str) -> str | None:
        sha = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            self._send(h, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}, method)
        return sha

    def _route(self, h: BaseHTTPRequestHandler, method: str, p: list[str], body: bytes) -> None:
        if method == "POST" and p[:3] == ["api", "repos", "create"]:
            if not self._authorised(h):
                return self._send(h, 401, {"error": "Invalid credentials"})
            payload = json.loads(body)
            self.create_payloads.append(payload)
            rid = f"{payload['organization']}/{payload['name']}"
            if rid in self.repos:
                return self._send(h, 409, {"error": "You already created this model repo", "url": ""})
            repo = self.repos[rid] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            repo.branches["main"] = repo.commit(None, {}, "initial commit")
            return self._send(h, 200, {"url": f"{self.url}/{rid}", "name": rid})
        if method == "POST" and p[:2] == ["api", "validate-yaml"]:
            return self._send(h, 200, {})
        if p[:2] == ["api", "models"] and len(p) >= 5:
            rid, action, rest = f"{p[2]}/{p[3]}", p[4], "/".join(p[5:])
            repo = self._repo(h, rid, method, write=method == "POST")
            if repo is None:
                return None
            if action == "revision":
                sha = self._sha(h, repo, rest, method)
                if sha:
                    files = repo.commits[sha]
                    self._send(h, 200, {"id": rid, "sha": sha, "private": repo.private,
                                        "siblings": [{"rfilename": f} for f in sorted(files)]}, method=method)
                return None
            if action == "tree":
                sha = self._sha(h, repo, rest, method)
                if sha:
                    self._send(h, 200, [{"type": "file", "oid": git_sha1(d), "size": len(d), "path": f}
                                        for f, d in sorted(repo.commits[sha].items())], method=method)
                return None
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                     for f in files]})
            if action == "branch":
                if rest in repo.branches:
                    return self._send(h, 409, {"error": "branch exists"})
                repo.branches[rest] = repo.branches["main"]
                return self._send(h, 200, {})
            if action == "commit":
                return self._commit(h, rid, repo, rest, body)
        if method in ("GET", "HEAD") and len(p) >= 5 and p[2] == "resolve":
            rid, rev, path = f"{p[0]}/{p[1]}", p[3], "/".join(p[4:])
            repo = self._repo(h, rid, method)
            if repo is None:
                return None
            sha = self._sha(h, repo, rev, method)
            if sha is None:
                return None
            files = repo.commits[sha]
            if path not in files:
                return self._send(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, method)
            data = files[path]
            return self._send(h, 200, data, {"X-Repo-Commit": sha, "ETag": f'"{git_sha1(data)}"'}, method)
        return self._send(h, 404, {"error": f"unknown endpoint {'/'.join(p)}"}, method=method)

    def _commit(self, h: BaseHTTPRequestHandler, rid: str, repo: Repo, rev: str, body: bytes) -> None:
        added: dict[str, bytes] = {}
        message = ""
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                message = item["value"]["summary"]
                self.commit_headers.append(item["value"])
            elif item["key"] == "file":
                v = item["value"]
                added[v["path"]] = base64.b64decode(v["content"])
            else:
                return self._send(h, 400, {"error": f"fake hub: unsupported commit op {item['key']}"})
        if rev not in repo.branches:
            return self._send(h, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        sha = repo.commit(repo.branches[rev], added, message)
        repo.branches[rev] = sha
        return self._send(h, 200, {"commitUrl": f"{self.url}/{rid}/commit/{sha}", "commitOid": sha,
                                   "pullRequestUrl": None})
