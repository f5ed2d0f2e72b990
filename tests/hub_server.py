"""A minimal Hugging Face Hub-compatible HTTP server for upload tests, bound to 127.0.0.1 only.

It implements the endpoints that `HfApi.whoami`, `create_repo`, `create_branch`, `create_commit` and `upload_folder`
call in huggingface_hub 2.x (read from its source): whoami-v2, repos/create (409 + url when the repo exists), model
info, validate-yaml, preupload, the NDJSON commit (base64 regular files and LFS pointers), the git-LFS batch API with a
plain PUT upload and verify, and branch creation. It does not implement Xet: files are answered "regular" in preupload
unless `lfs_threshold` is set, in which case the client must run with HF_HUB_DISABLE_XET=1 to use the LFS batch API.

Repositories live in memory, file contents on disk under `root/objects/<sha256>`. One token is valid; any other gets
401. Every request is recorded in `requests` (method, path, status), and `inject_fault` makes chosen requests fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

VALID_TOKEN = "hf_loopbackTestToken0123456789abcdefXYZ"
USER = "tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
RELATIONS = ("adapter", "merge", "quantized", "finetune")

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"
_ROUTES = [
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("GET", re.compile(r"^/api/agent-harnesses$"), "agent_harnesses"),  # the client's best-effort telemetry fetch
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/{_REV})?$"), "model_info"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/{_REV}$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/{_REV}$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/{_REV}$"), "create_branch"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$"), "lfs_verify"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1 of "blob <size>\\0" + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    size: int
    lfs: bool
    git_oid: str  # sha1 blob id for regular files (what preupload reports), sha256 for LFS files


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    status: int


class HttpError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra or {}


class HubServer:
    """The Hub state plus a ThreadingHTTPServer serving it on 127.0.0.1:<ephemeral port>."""

    def __init__(self, root: str | Path, *, token: str = VALID_TOKEN, user: str = USER,
                 lfs_threshold: int | None = None):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.token, self.user, self.lfs_threshold = token, user, lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.errors: list[str] = []  # unexpected exceptions inside handlers (a test should assert it stays empty)
        self._faults: list[list] = []  # [method, compiled regex, remaining, status]
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> HubServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- test helpers
    def inject_fault(self, method: str, path_regex: str, *, times: int = 1, status: int = 507) -> None:
        """Make the next `times` requests matching (method, path) fail with `status` (507 is not retried)."""
        with self._lock:
            self._faults.append([method, re.compile(path_regex), times, status])

    def files(self, repo_id: str, revision: str = "main") -> dict[str, Path]:
        """Path in repo -> the stored bytes on disk, at the head of `revision`."""
        head = self.repos[repo_id].branches[revision][-1]
        return {path: self.objects / f.sha256 for path, f in head.files.items()}

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        return self.repos[repo_id].branches[revision][-1]

    def sent(self) -> list[tuple[str, str]]:
        """(method, path) of every request except the client's unauthenticated telemetry fetch."""
        return [(r.method, r.path) for r in self.requests if r.path != "/api/agent-harnesses"]

    def count(self, method: str | None = None, pattern: str = "") -> int:
        """Number of recorded requests whose method matches and whose path contains `pattern`."""
        return sum(1 for r in self.requests if (method is None or r.method == method) and pattern in r.path)

    # ---------------------------------------------------------------- plumbing
    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.objects / sha
        if not path.exists():
            tmp = path.with_suffix(".tmp" + str(threading.get_ident()))
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def _fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault[0] == method and fault[2] > 0 and fault[1].search(path):
                    fault[2] -= 1
                    return fault[3]
        return None

    def _auth(self, headers) -> None:
        value = headers.get("Authorization", "")
        if value != f"Bearer {self.token}":
            raise HttpError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        if write and repo_id.split("/")[0] != self.user:
            raise HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _branch(self, repo: Repo, rev: str) -> list[Commit]:
        rev = unquote(rev)
        if rev not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.branches[rev]

    def _upload_mode(self, size: int) -> str:
        return "lfs" if self.lfs_threshold is not None and size >= self.lfs_threshold else "regular"

    def _new_commit(self, parent: Commit | None, message: str, files: dict[str, StoredFile]) -> Commit:
        blob = json.dumps([parent.oid if parent else None, message,
                           sorted((p, f.sha256) for p, f in files.items())]).encode()
        return Commit(oid=hashlib.sha1(blob).hexdigest(), message=message, files=files)

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, dict]:
        """Route one request; returns (status, json body, extra headers)."""
        path = urlsplit(raw_path).path
        query = parse_qs(urlsplit(raw_path).query)
        status = self._fault(method, path)
        if status is not None:
            return status, {"error": f"injected fault on {method} {path}"}, {}
        for route_method, regex, name in _ROUTES:
            match = regex.match(path)
            if match and route_method == method:
                try:
                    with self._lock:
                        return 200, getattr(self, f"_h_{name}")(headers, body, query, **match.groupdict()), {}
                except HttpError as e:
                    extra = {"X-Error-Code": e.error_code} if e.error_code else {}
                    return e.status, {"error": e.message, **e.extra}, extra
        return 404, {"error": f"{method} {path} is not implemented by the test hub"}, {}

    # ---------------------------------------------------------------- endpoints
    def _h_whoami(self, headers, body, query):
        self._auth(headers)
        return {"type": "user", "name": self.user, "orgs": [], "auth": {"type": "access_token",
                                                                          "accessToken": {"role": "write"}}}

    def _h_agent_harnesses(self, headers, body, query):
        return {"standardEnvVars": [], "harnesses": {}}

    def _h_create_repo(self, headers, body, query):
        self._auth(headers)
        req = json.loads(body)
        if req.get("type", "model") not in (None, "model"):
            raise HttpError(400, "only model repos are implemented by the test hub")
        owner = req.get("organization") or self.user
        repo_id = f"{owner}/{req['name']}"
        url = f"{self._base}/{repo_id}"
        if owner != self.user:
            raise HttpError(403, f"You don't have the rights to create a model under the namespace {owner!r}")
        if repo_id in self.repos:
            raise HttpError(409, "You already created this model repo", extra={"url": url})
        private = req.get("visibility") == "private" or bool(req.get("private"))
        repo = Repo(repo_id=repo_id, private=private)
        sha = self._store(GITATTRIBUTES)
        initial = {".gitattributes": StoredFile(sha, len(GITATTRIBUTES), False, git_blob_oid(GITATTRIBUTES))}
        repo.branches["main"] = [self._new_commit(None, "initial commit", initial)]
        self.repos[repo_id] = repo
        return {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def _h_validate_yaml(self, headers, body, query):
        content = json.loads(body)["content"]
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append("metadata block is not closed by ---")
            else:
                try:
                    meta = yaml.safe_load(content[3:end])
                except yaml.YAMLError as e:
                    errors.append(f"invalid YAML: {e}")
                else:
                    meta = meta or {}
                    if not isinstance(meta, dict):
                        errors.append("metadata must be a mapping")
                    elif meta.get("base_model_relation") not in (None, *RELATIONS):
                        errors.append(f"base_model_relation must be one of {RELATIONS}")
                    elif "base_model_relation" in meta and not meta.get("base_model"):
                        errors.append("base_model_relation needs base_model")
                    elif not isinstance(meta.get("tags", []), list):
                        errors.append("tags must be a list")
        if errors:
            raise HttpError(400, "invalid metadata", extra={"errors": [{"message": m} for m in errors]})
        return {"errors": [], "warnings": []}

    def _h_model_info(self, headers, body, query, repo, rev=None):
        r = self._repo(repo)
        if r.private:
            try:
                self._auth(headers)
            except HttpError:
                raise HttpError(404, "Repository not found", "RepoNotFound") from None
        head = self._branch(r, rev or "main")[-1]
        return {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": head.oid, "private": r.private,
                "siblings": [{"rfilename": p} for p in sorted(head.files)], "tags": []}

    def _h_create_branch(self, headers, body, query, repo, rev):
        self._auth(headers)
        r = self._repo(repo, write=True)
        name = unquote(rev)
        if name in r.branches:
            raise HttpError(409, f"Reference already exists: refs/heads/{name}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        r.branches[name] = [self._branch(r, start)[-1]]
        return {}

    def _h_preupload(self, headers, body, query, repo, rev):
        self._auth(headers)
        r = self._repo(repo, write=True)
        head = self._branch(r, rev)[-1]
        answer = []
        for f in json.loads(body)["files"]:
            existing = head.files.get(f["path"])
            answer.append({"path": f["path"], "uploadMode": self._upload_mode(int(f["size"])), "shouldIgnore": False,
                           "oid": existing.git_oid if existing else None})
        return {"files": answer, "commitOid": head.oid}

    def _h_commit(self, headers, body, query, repo, rev):
        self._auth(headers)
        r = self._repo(repo, write=True)
        if query.get("create_pr"):
            raise HttpError(400, "pull requests are not implemented by the test hub")
        branch = self._branch(r, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not branch[-1].oid.startswith(parent):
            raise HttpError(412, "A commit has happened since; parentCommit is outdated")
        files = dict(branch[-1].files)
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HttpError(400, "only base64 file content is implemented")
                data = base64.b64decode(value["content"])
                files[value["path"]] = StoredFile(self._store(data), len(data), False, git_blob_oid(data))
            elif key == "lfsFile":
                oid, size = value["oid"], int(value["size"])
                stored = self.objects / oid
                if value.get("algo", "sha256") != "sha256" or not stored.exists() or stored.stat().st_size != size:
                    raise HttpError(422, f"LFS pointer {value['path']} points to an object that was never uploaded")
                files[value["path"]] = StoredFile(oid, size, True, oid)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
            else:
                raise HttpError(400, f"commit operation {key!r} is not implemented by the test hub")
        commit = self._new_commit(branch[-1], header.get("summary", ""), files)
        branch.append(commit)
        return {"success": True, "commitOid": commit.oid, "commitUrl": f"{self._base}/{repo}/commit/{commit.oid}",
                "pullRequestUrl": None}

    def _h_lfs_batch(self, headers, body, query, repo):
        self._auth(headers)
        self._repo(repo, write=True)
        req = json.loads(body)
        if req.get("operation") != "upload":
            raise HttpError(400, "only LFS uploads are implemented")
        objects = []
        for obj in req["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size}
            stored = self.objects / oid
            if not (stored.exists() and stored.stat().st_size == size):
                entry["actions"] = {
                    "upload": {"href": f"{self._base}/lfs-upload/{oid}", "header": {}},
                    "verify": {"href": f"{self._base}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _h_lfs_put(self, headers, body, query, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HttpError(400, "uploaded content does not match its oid")
        self._store(body)
        return {}

    def _h_lfs_verify(self, headers, body, query, repo):
        self._auth(headers)
        req = json.loads(body)
        stored = self.objects / req["oid"]
        if not stored.exists() or stored.stat().st_size != int(req["size"]):
            raise HttpError(404, "object not found")
        return {}

    @property
    def _base(self) -> str:
        return self.url


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    hub: HubServer  # set by HubServer.start

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
            status, payload, extra = self.hub.handle(method, self.path, self.headers, body)
        except Exception as e:  # noqa: BLE001  (a bug in the test hub: answer 500 and record it for the test to see)
            self.hub.errors.append(f"{method} {self.path}: {e!r}")
            status, payload, extra = 500, {"error": repr(e)}, {}
        data = json.dumps(payload).encode()
        self.hub.requests.append(Request(method, urlsplit(self.path).path, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args) -> None:  # keep test output clean; requests are recorded instead
        pass
