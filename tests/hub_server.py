"""A minimal local stand-in for the Hugging Face Hub HTTP API, recording every request huggingface_hub sends.

It implements what ``create_repo``, ``repo_info``, ``create_branch`` and ``create_commit`` call (huggingface_hub 2.x with Xet
disabled): repo creation and info, branch creation, README metadata validation, preupload (LFS for ``*.safetensors``,
regular otherwise), the git-LFS batch API with basic PUT transfers, and the NDJSON commit endpoint. Any other
request is answered 404 and recorded, so a test sees unexpected calls. It binds to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubState:
    def __init__(self):
        self.requests: list[dict] = []  # method, path, headers, json (parsed body when JSON)
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}  # oid -> content
        self.commits: list[dict] = []  # repo_id, revision, summary, files


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, payload=None):
            body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _record(self, body: bytes):
            entry = {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers),
                "size": len(body),
            }
            try:
                entry["json"] = json.loads(body) if body else None
            except ValueError:
                entry["json"] = None
            state.requests.append(entry)
            return entry

        @property
        def base(self) -> str:
            return f"http://{self.headers['Host']}"

        def do_PUT(self):
            body = self._body()
            self._record(body)
            match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
            if not match or hashlib.sha256(body).hexdigest() != match.group(1):
                return self._send(400, {"error": "bad upload"})
            state.lfs[match.group(1)] = body
            self._send(200)

        def do_POST(self):
            body = self._body()
            entry = self._record(body)
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                payload = entry["json"]
                repo_id = f"{payload['organization']}/{payload['name']}"
                if repo_id in state.repos:
                    return self._send(
                        409, {"error": "You already created this model repo", "url": f"{self.base}/{repo_id}"}
                    )
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                state.repos[repo_id] = {"private": private, "branches": {"main": {}}}
                return self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path):
                repo = state.repos.get(m.group(1))
                if repo is None:
                    return self._send(404, {"error": "Repository not found"})
                if m.group(2) in repo["branches"]:
                    return self._send(409, {"error": "Reference already exists"})
                repo["branches"][m.group(2)] = dict(repo["branches"]["main"])
                return self._send(200)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                if m.group(1) not in state.repos:
                    return self._send(404, {"error": "Repository not found"})
                files = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for f in entry["json"]["files"]
                ]
                return self._send(200, {"files": files, "commitOid": "0" * 40})
            if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                objects = [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "authenticated": True,
                        "actions": {"upload": {"href": f"{self.base}/lfs-upload/{o['oid']}"}},
                    }
                    for o in entry["json"]["objects"]
                ]
                return self._send(200, {"transfer": "basic", "objects": objects})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                repo_id, revision = m.group(1), m.group(2)
                repo = state.repos.get(repo_id)
                if repo is None or revision not in repo["branches"]:
                    return self._send(404, {"error": "Repository or revision not found"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files, summary = {}, None
                for line in lines:
                    value = line["value"]
                    if line["key"] == "header":
                        summary = value["summary"]
                    elif line["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in state.lfs:
                            return self._send(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                        files[value["path"]] = state.lfs[value["oid"]]
                repo["branches"][revision].update(files)
                oid = hashlib.sha1(body).hexdigest()
                state.commits.append(
                    {"repo_id": repo_id, "revision": revision, "summary": summary, "files": files}
                )
                return self._send(
                    200,
                    {
                        "commitUrl": f"{self.base}/{repo_id}/commit/{oid}",
                        "commitOid": oid,
                        "pullRequestUrl": None,
                    },
                )
            self._send(404, {"error": f"not implemented: POST {path}"})

        def do_GET(self):
            self._record(b"")
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)", self.path.split("?")[0]):
                repo = state.repos.get(m.group(1))
                if repo is None:
                    return self._send(404, {"error": "Repository not found"})
                return self._send(200, {"id": m.group(1), "private": repo["private"], "sha": "0" * 40})
            self._send(404, {"error": f"not implemented: GET {self.path}"})

    return Handler


class LocalHub:
    """``with LocalHub() as hub:`` serves on 127.0.0.1:<free port>; ``hub.url`` is the HF_ENDPOINT."""

    def __init__(self):
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
