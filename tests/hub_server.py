"""A small HTTP server on 127.0.0.1 that speaks the Hugging Face Hub's download protocol.

Enough for the real `huggingface_hub` client: repo info per revision, refs, recursive tree
listings, and HEAD/GET (with ranges) of files under `/{repo}/resolve/{revision}/{path}`,
with the Hub's error codes (`X-Error-Code`) for missing repos, revisions and files, and
gated repos. Every request is recorded in `requests`, so tests can count downloads.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    """Commits (sha -> {path: bytes}) and refs (branch or tag name -> sha)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    def commit(self, files: dict[str, bytes], *, branch: str | None = None, tag: str | None = None) -> str:
        sha = hashlib.sha1(
            json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())).encode()
            + str(len(self.commits)).encode()
        ).hexdigest()
        self.commits[sha] = dict(files)
        if branch:
            self.branches[branch] = sha
        if tag:
            self.tags[tag] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.branches.get(revision) or self.tags.get(revision)


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self) -> list[str]:
        """Paths of the files fetched whole with GET so far (ranged reads of headers excluded)."""
        return [
            path
            for method, path, ranged in self.requests
            if method == "GET" and "/resolve/" in path and ranged is None
        ]


_REVISION_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$")
_REFS_API = re.compile(r"^/api/models/([^/]+/[^/]+)/refs$")
_TREE_API = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path, self.headers.get("Range")))
            for pattern, route in (
                (_REVISION_API, self._revision),
                (_REFS_API, self._refs),
                (_TREE_API, self._tree),
                (_RESOLVE, self._resolve),
            ):
                match = pattern.match(path)
                if match:
                    repo_id = unquote(match.group(1))
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                    if repo.gated:
                        return self._error(403, "GatedRepo", f"Access to {repo_id} is restricted")
                    return route(repo_id, repo, [unquote(g) if g else g for g in match.groups()[1:]], body)
            self._error(404, None, "Not found")

        def _sha(self, repo: Repo, revision: str) -> str | None:
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return sha

        def _revision(self, repo_id, repo, groups, body):
            sha = self._sha(repo, groups[0] or "main")
            if sha:
                files = repo.commits[sha]
                self._json(
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": sha,
                        "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    },
                    body,
                )

        def _refs(self, repo_id, repo, groups, body):
            def refs(names, kind):
                return [
                    {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s}
                    for n, s in sorted(names.items())
                ]

            self._json(
                {
                    "branches": refs(repo.branches, "heads"),
                    "tags": refs(repo.tags, "tags"),
                    "converts": [],
                    "pullRequests": [],
                },
                body,
            )

        def _tree(self, repo_id, repo, groups, body):
            sha = self._sha(repo, groups[0])
            if not sha:
                return
            prefix = (groups[1] or "").strip("/")
            entries, folders = [], set()
            for file, data in sorted(repo.commits[sha].items()):
                if prefix and not file.startswith(prefix + "/"):
                    continue
                parts = file.split("/")
                for depth in range(1, len(parts)):
                    folders.add("/".join(parts[:depth]))
                entries.append(
                    {"type": "file", "path": file, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                )
            entries += [
                {"type": "directory", "path": f, "size": 0, "oid": "0" * 40}
                for f in sorted(folders)
                if not prefix or f.startswith(prefix + "/")
            ]
            self._json(entries, body)

        def _resolve(self, repo_id, repo, groups, body):
            revision, file = groups
            sha = self._sha(repo, revision)
            if not sha:
                return
            data = repo.commits[sha].get(file)
            if data is None:
                return self._error(404, "EntryNotFound", f"{file} does not exist at {revision}")
            status, start, end = 200, 0, len(data)
            match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match:
                status, start = 206, int(match.group(1))
                end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
            self.send_response(status)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(data[start:end])

        def _json(self, content, body):
            data = json.dumps(content).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status, code, message):
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
