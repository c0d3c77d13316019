"""A Hub-compatible HTTP server on 127.0.0.1 for offline push/pull tests.

It implements the routes huggingface_hub and transformers use to create repos, commit (NDJSON,
inline "regular" files, refused with 412 when ``parentCommit`` is no longer the head; the code
under test takes 409 the same way, not having checked which the Hub sends), read repo info and trees, and resolve files (NOTES.md lists them). It keeps every repo in
memory, records each commit, and requires ``Bearer <token>`` for writes so that authentication
failures can be tested.

Faults (``HubServer.fail``) make the next requests of a route fail the ways a real Hub does:
``500`` (an error answer, nothing applied), ``drop`` (the connection closed with no answer,
nothing applied), ``lost-answer`` (the request applied, then the connection closed: the client
cannot know it landed), ``hang`` (no answer until the client gives up, nothing applied).
``before_commit`` runs a callback before a commit is applied (another writer landing first).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

TOKEN = "hf_offline_test_token"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


FAULT_MODES = ("500", "drop", "lost-answer", "hang")


@dataclass
class Fault:
    method: str
    route: str  # a substring of the request path, e.g. "/commit/", "/preupload/", "/resolve/"
    mode: str
    times: int


class HubState:
    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self.before_commit: list = []  # callbacks, each run once before the next commit is applied
        self.hang_s = 30.0

    def take_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.route in path and fault.times > 0:
                    fault.times -= 1
                    return fault.mode
        return None


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        # -- helpers -------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"):
            if getattr(self, "fault", None) == "lost-answer":
                return self._drop()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict | None = None):
            self._send(status, json.dumps(payload).encode(), headers)

        def _error(self, status: int, code: str, message: str):
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _drop(self):
            """Close the connection without an answer."""
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _fault_first(self) -> bool:
            """Apply a fault taken for this request; True when the request ends here unanswered."""
            self.fault = state.take_fault(self.command, urlparse(self.path).path)
            if self.fault == "500":
                self._error(500, "InternalError", "Internal Error - We're working hard to fix this as soon as possible!")
                return True
            if self.fault == "drop":
                self._drop()
                return True
            if self.fault == "hang":
                deadline = time.monotonic() + state.hang_s
                self.connection.settimeout(0.2)
                while time.monotonic() < deadline:  # until the client gives up (closes) or the hang ends
                    try:
                        if self.connection.recv(1, socket.MSG_PEEK) == b"":
                            break
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                self._drop()
                return True
            return False

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {TOKEN}"

        def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
            return state.repos.get((repo_type, repo_id))

        # -- routes --------------------------------------------------------------------------
        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            if self._fault_first():
                return
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts[:2] == ["api", "whoami-v2"]:
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials")
                return self._json(200, {"name": "tester", "type": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}})
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                repo_type = parts[1][:-1]
                repo_id = "/".join(parts[2:4])
                repo = self._repo(repo_type, repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                rest = parts[4:]
                if not rest or rest[0] == "revision":
                    siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())]
                    return self._json(200, {"id": repo_id, "sha": repo.sha, "siblings": siblings, "private": False, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z"})
                if rest[0] == "tree":
                    prefix = "/".join(rest[2:])
                    recursive = parse_qs(url.query).get("recursive", ["false"])[0] in ("true", "True", "1")
                    entries, dirs = [], set()
                    for p, d in sorted(repo.files.items()):
                        if prefix and not p.startswith(prefix + "/"):
                            continue
                        relative = p[len(prefix) + 1 :] if prefix else p
                        if not recursive and "/" in relative:
                            dirs.add((prefix + "/" if prefix else "") + relative.split("/")[0])
                            continue
                        entries.append({"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d)})
                    entries += [{"type": "directory", "path": d, "size": 0, "oid": "0" * 40} for d in sorted(dirs)]
                    return self._json(200, entries)
                if rest[0] == "commits":
                    return self._json(200, [{"id": c["oid"], "title": c["title"], "message": "", "authors": [], "date": "2026-01-01T00:00:00.000Z"} for c in reversed(repo.commits)])
                return self._error(404, "EntryNotFound", "unknown route")
            # File resolution: [datasets/]ORG/NAME/resolve/REV/PATH
            repo_type = "model"
            if parts[0] == "datasets":
                repo_type, parts = "dataset", parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id, path = "/".join(parts[:2]), "/".join(parts[4:])
                repo = self._repo(repo_type, repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                if path not in repo.files:
                    return self._error(404, "EntryNotFound", f"{path} not found in {repo_id}")
                data = repo.files[path]
                etag = f'"{git_blob_sha(data)}"'
                return self._send(200, data, {"X-Repo-Commit": repo.sha, "ETag": etag}, content_type="application/octet-stream")
            return self._error(404, "EntryNotFound", f"unknown route {url.path}")

        def do_POST(self):
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            body = self._body()
            if self._fault_first():
                return
            if parts == ["api", "validate-yaml"]:
                return self._json(200, {"errors": [], "warnings": []})
            if not self._authorized():
                return self._error(401, "Unauthorized", "Invalid username or password.")
            if parts == ["api", "repos", "create"]:
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
                key = (payload.get("type") or "model", repo_id)
                url = f"http://{self.headers['Host']}/{'datasets/' if key[0] == 'dataset' else ''}{repo_id}"
                with state.lock:
                    if key in state.repos:
                        return self._json(409, {"error": "You already created this repo", "url": url})
                    state.repos[key] = Repo()
                return self._json(200, {"url": url, "name": repo_id})
            if len(parts) >= 6 and parts[0] == "api" and parts[1] in ("models", "datasets") and parts[4] in ("preupload", "commit"):
                repo_type, repo_id = parts[1][:-1], "/".join(parts[2:4])
                repo = self._repo(repo_type, repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                if parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    answer = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": git_blob_sha(repo.files[f["path"]]) if f["path"] in repo.files else None}
                        for f in files
                    ]
                    return self._json(200, {"files": answer})
                header, changes = {}, {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        header = item["value"]
                    elif item["key"] == "file":
                        changes[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        changes[item["value"]["path"]] = None
                    else:
                        return self._error(400, "BadRequest", f"unsupported commit item {item['key']}")
                while state.before_commit:
                    state.before_commit.pop(0)()
                with state.lock:
                    parent = header.get("parentCommit")
                    if parent and parent != repo.sha:
                        return self._error(412, "PreconditionFailed", "A commit has happened since. Please refresh and try again.")
                    for path, data in changes.items():
                        if data is None:
                            repo.files.pop(path, None)
                        else:
                            repo.files[path] = data
                    oid = hashlib.sha1(json.dumps([repo.sha, sorted(changes)]).encode() + str(len(repo.commits)).encode()).hexdigest()
                    repo.commits.append({"oid": oid, "title": header.get("summary", ""), "paths": sorted(changes)})
                url = f"http://{self.headers['Host']}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}/commit/{oid}"
                return self._json(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})
            return self._error(404, "EntryNotFound", f"unknown route {url.path}")

    return Handler


class HubServer:
    """``with HubServer() as hub: ... hub.endpoint ... hub.state.repos``"""

    def __init__(self):
        self.state = HubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.state.repos[(repo_type, repo_id)]

    def fail(self, route: str, mode: str, times: int = 1, method: str = "POST") -> None:
        """The next ``times`` requests whose path contains ``route`` fail as ``mode``."""
        assert mode in FAULT_MODES, mode
        with self.state.lock:
            self.state.faults.append(Fault(method, route, mode, times))
