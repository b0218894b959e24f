"""A small HTTP server on 127.0.0.1 that speaks the Hugging Face Hub's download protocol.

Enough for the real `huggingface_hub` client: repo info per revision, refs, recursive tree
listings, and HEAD/GET (with ranges) of files under `/{repo}/resolve/{revision}/{path}`,
with the Hub's error codes (`X-Error-Code`) for missing repos, revisions and files, and
gated repos. Every request is recorded in `requests`, so tests can count downloads.

`hostile` switches on the behaviours of a compromised or broken Hub: answers that
trickle, stall, stop short of their `Content-Length` or are not JSON, a reported
commit id, ETag, tree entries or file sizes of its choosing (see `Hostile`).
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
    pull_requests: dict[str, str] = field(default_factory=dict)  # ref ("refs/pr/1") -> sha
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
        return self.branches.get(revision) or self.tags.get(revision) or self.pull_requests.get(revision)


@dataclass
class Hostile:
    """What a compromised Hub does; the patterns are regular expressions searched in request paths.

    Attributes:
        trickle: GET bodies sent one byte every two seconds.
        silent: GET bodies never sent (the headers are).
        short: GET bodies cut to half their `Content-Length`, then the connection closed.
        garbage: API answers that are not JSON.
        sha: the commit id the revision API reports, instead of the real one.
        etag: the ETag of every file, instead of its hash.
        commit_header: the `X-Repo-Commit` of every file, instead of its commit id.
        tree: entries added to every tree listing.
        sizes: path -> the size the tree listing reports for that file.
    """

    trickle: str | None = None
    silent: str | None = None
    short: str | None = None
    garbage: str | None = None
    sha: str | None = None
    etag: str | None = None
    commit_header: str | None = None
    tree: list[dict] = field(default_factory=list)
    sizes: dict[str, object] = field(default_factory=dict)


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.hostile = Hostile()
        self._stopping = threading.Event()  # ends trickling and silent answers
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
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
                        "sha": hub.hostile.sha or sha,
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
                    "pullRequests": [
                        {"name": ref.rsplit("/", 1)[-1], "ref": ref, "targetCommit": s}
                        for ref, s in sorted(repo.pull_requests.items())
                    ],
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
                size = hub.hostile.sizes.get(file, len(data))
                oid = hashlib.sha1(data).hexdigest()
                entries.append({"type": "file", "path": file, "size": size, "oid": oid})
            entries += [
                {"type": "directory", "path": f, "size": 0, "oid": "0" * 40}
                for f in sorted(folders)
                if not prefix or f.startswith(prefix + "/")
            ]
            self._json(entries + hub.hostile.tree, body)

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
            self.send_header("X-Repo-Commit", hub.hostile.commit_header or sha)
            self.send_header("ETag", f'"{hub.hostile.etag or hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if body:
                self._send_body(data[start:end])

        def _json(self, content, body):
            data = json.dumps(content).encode()
            if self._hostile(hub.hostile.garbage):
                data = b"{this is not JSON"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self._send_body(data)

        def _hostile(self, pattern: str | None) -> bool:
            return pattern is not None and re.search(pattern, urlsplit(self.path).path) is not None

        def _trickle(self, data: bytes):
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    if hub._stopping.wait(2):
                        return
            except OSError:  # the client gave up, as it should
                self.close_connection = True

        def _send_body(self, data: bytes):
            """The body as the hostile settings say: whole, trickling, never, or cut short."""
            if self._hostile(hub.hostile.trickle):
                self._trickle(data)
            elif self._hostile(hub.hostile.silent):
                self.wfile.flush()
                hub._stopping.wait()
            elif self._hostile(hub.hostile.short):
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
            else:
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
