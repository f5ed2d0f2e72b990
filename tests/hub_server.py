"""A minimal Hugging Face Hub-compatible HTTP server for upload and download tests, bound to 127.0.0.1 only.

Upload side: the endpoints that `HfApi.whoami`, `create_repo`, `create_branch`, `create_commit` and `upload_folder`
call in huggingface_hub 2.x (read from its source): whoami-v2, repos/create (409 + url when the repo exists), model
info, validate-yaml, preupload, the NDJSON commit (base64 regular files and LFS pointers), the git-LFS batch API with a
plain PUT upload and verify, and branch creation. It does not implement Xet: files are answered "regular" in preupload
unless `lfs_threshold` is set, in which case the client must run with HF_HUB_DISABLE_XET=1 to use the LFS batch API.

Download side (what `list_repo_files`, `repo_info` and `snapshot_download`/`hf_hub_download` call): model info at a
branch or a full commit id (`sha`, `siblings`), the tree listing (recursive or not, under a folder, paginated with a
`Link: rel="next"` header every `tree_page_size` entries), and `HEAD`/`GET /{repo}/resolve/{rev}/{path}`. A regular
file is answered 200 with `ETag` (its git blob id), `X-Repo-Commit` and `Content-Length`; an LFS file (what
.gitattributes tracks: *.safetensors, *.bin) is answered like the real Hub with a 302 whose `Location` is a "CDN" on
another origin (`http://localhost:<port>/cdn/<sha256>`, so the client stops there and drops its token), carrying
`X-Linked-Etag` (the sha256), `X-Linked-Size` and `X-Repo-Commit`; the CDN refuses a request that carries an
Authorization header, as a signed storage URL does. No Xet header or `xetHash` is ever sent, so hf_xet is never used.
Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) so the client raises its typed errors.

Repositories live in memory, file contents on disk under `root/objects/<sha256>`; `add_files` places files directly
(no upload round trip). One token is valid; any other gets 401. Every request is recorded in `requests` (method, path,
status, host, whether it carried a token), and `inject_fault` makes chosen requests fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

VALID_TOKEN = "hf_loopbackTestToken0123456789abcdefXYZ"
USER = "tester"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_PATTERNS = ("*.safetensors", "*.bin")  # what GITATTRIBUTES tracks with LFS
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
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/{_REV}(?:/(?P<sub>.*))?$"), "tree"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<file>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<file>.+)$"), "resolve"),
    ("GET", re.compile(r"^/cdn/(?P<oid>[0-9a-f]{64})$"), "cdn"),
]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1 of "blob <size>\\0" + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file git stores in place of an LFS-tracked file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


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
    host: str = ""  # the Host header: 127.0.0.1:<port> for the Hub, localhost:<port> for the CDN
    authorized: bool = False  # the request carried an Authorization header


@dataclass(frozen=True)
class Raw:
    """A non-JSON answer: status, headers and a body (bytes, or a stored file)."""

    status: int
    headers: dict
    body: bytes | Path = b""


class HttpError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra or {}
        self.headers = headers or {}


class HubServer:
    """The Hub state plus a ThreadingHTTPServer serving it on 127.0.0.1:<ephemeral port>."""

    def __init__(self, root: str | Path, *, token: str = VALID_TOKEN, user: str = USER,
                 lfs_threshold: int | None = None, tree_page_size: int = 1000, cdn_host: str = "localhost"):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.token, self.user, self.lfs_threshold = token, user, lfs_threshold
        self.tree_page_size, self.cdn_host = tree_page_size, cdn_host
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.errors: list[str] = []  # unexpected exceptions inside handlers (a test should assert it stays empty)
        self._served: list[str] = []  # sha256 of the objects whose bytes a GET sent
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

    def add_files(self, repo_id: str, files: Mapping[str, bytes | str | Path], *, revision: str = "main",
                  private: bool = False, message: str = "add files") -> Commit:
        """Commit `files` (path in repo -> content or a local file) straight into the store, creating the repo (with
        .gitattributes, as create_repo does) and the branch (from main) when missing. LFS_PATTERNS files are LFS."""
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = Repo(repo_id=repo_id, private=private)
                sha = self._store(GITATTRIBUTES)
                initial = {".gitattributes": StoredFile(sha, len(GITATTRIBUTES), False, git_blob_oid(GITATTRIBUTES))}
                repo.branches["main"] = [self._new_commit(None, "initial commit", initial)]
                self.repos[repo_id] = repo
            branch = repo.branches.setdefault(revision, [repo.branches["main"][-1]])
            tree = dict(branch[-1].files)
            for path, content in files.items():
                data = content if isinstance(content, bytes) else Path(content).read_bytes()
                sha, lfs = self._store(data), any(fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
                tree[path] = StoredFile(sha, len(data), lfs, sha if lfs else git_blob_oid(data))
            commit = self._new_commit(branch[-1], message, tree)
            branch.append(commit)
            return commit

    def downloaded(self) -> set[str]:
        """Sha256 of every stored object whose bytes were sent (GET of a regular file or of a CDN object)."""
        return set(self._served)

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

    def _readable(self, repo_id: str, headers) -> Repo:
        """The repo for a read: a private one without the valid token is answered as missing, as the Hub does."""
        repo = self._repo(repo_id)
        if repo.private:
            try:
                self._auth(headers)
            except HttpError:
                raise HttpError(404, "Repository not found", "RepoNotFound") from None
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        """The commit a revision names: a branch's head, or any commit by its full 40-hex id."""
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev][-1]
        for commits in repo.branches.values():
            for c in commits:
                if c.oid == rev:
                    return c
        raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

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
                        answer = getattr(self, f"_h_{name}")(headers, body, query, **match.groupdict())
                    if isinstance(answer, Raw):
                        return answer.status, answer, {}
                    return 200, answer, {}
                except HttpError as e:
                    extra = {"X-Error-Code": e.error_code} if e.error_code else {}
                    return e.status, {"error": e.message, **e.extra}, {**extra, **e.headers}
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
        r = self._readable(repo, headers)
        head = self._commit(r, rev or "main")
        return {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": head.oid, "private": r.private,
                "siblings": [{"rfilename": p} for p in sorted(head.files)], "tags": []}

    def _h_tree(self, headers, body, query, repo, rev, sub=None):
        commit = self._commit(self._readable(repo, headers), rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = unquote(sub).strip("/") + "/" if sub and sub.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, f in commit.files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "path": folder,
                                   "oid": hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest()}
            if recursive or len(parts) == 1:
                entry = {"type": "file", "path": path, "size": f.size, "oid": f.git_oid}
                if f.lfs:
                    pointer = lfs_pointer(f.sha256, f.size)
                    entry["oid"] = git_blob_oid(pointer)
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(pointer)}
                entries[path] = entry
        if prefix and not entries:
            raise HttpError(404, f"{prefix.rstrip('/')} does not exist at {commit.oid}", "EntryNotFound")
        ordered = [entries[k] for k in sorted(entries)]
        cursor = int(query.get("cursor", ["0"])[0])
        page = ordered[cursor:cursor + self.tree_page_size]
        out = {"Content-Type": "application/json"}
        if cursor + self.tree_page_size < len(ordered):
            rec = "true" if recursive else "false"
            out["Link"] = (f'<{self._base}/api/models/{repo}/tree/{rev}{"/" + sub if sub else ""}?recursive={rec}'
                           f'&cursor={cursor + self.tree_page_size}>; rel="next"')
        return Raw(200, out, json.dumps(page).encode())

    def _h_resolve(self, headers, body, query, repo, rev, file):
        commit = self._commit(self._readable(repo, headers), rev)
        path = unquote(file)
        f = commit.files.get(path)
        if f is None:
            raise HttpError(404, f"{path} does not exist at {commit.oid}", "EntryNotFound",
                            headers={"X-Repo-Commit": commit.oid})
        if f.lfs:  # the Hub answers LFS files with a redirect to signed storage on another host
            port = self.url.rsplit(":", 1)[1]
            return Raw(302, {"Location": f"http://{self.cdn_host}:{port}/cdn/{f.sha256}?expires=never",
                             "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                             "X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(lfs_pointer(f.sha256, f.size))}"'})
        return self._object(f.sha256, {"ETag": f'"{f.git_oid}"', "X-Repo-Commit": commit.oid})

    def _h_cdn(self, headers, body, query, oid):
        if headers.get("Authorization"):
            raise HttpError(400, "Only one auth mechanism allowed; the signed URL already authorizes this request")
        if not (self.objects / oid).is_file():
            raise HttpError(404, "NoSuchKey")
        return self._object(oid, {"ETag": f'"{oid}"'})

    def _object(self, sha256: str, extra: dict) -> Raw:
        return Raw(200, {"Content-Type": "application/octet-stream", **extra}, self.objects / sha256)

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
        self.hub.requests.append(Request(method, urlsplit(self.path).path, status, self.headers.get("Host", ""),
                                          bool(self.headers.get("Authorization"))))
        if isinstance(payload, Raw):
            self._send_raw(method, payload)
            return
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _send_raw(self, method: str, raw: Raw) -> None:
        """Send a Raw answer; HEAD gets the same headers (Content-Length of the full body) and no body."""
        length = raw.body.stat().st_size if isinstance(raw.body, Path) else len(raw.body)
        self.send_response(raw.status)
        for key, value in raw.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "HEAD":
            return
        if isinstance(raw.body, Path):
            with open(raw.body, "rb") as f:
                shutil.copyfileobj(f, self.wfile)
            self.hub._served.append(raw.body.name)
        else:
            self.wfile.write(raw.body)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args) -> None:  # keep test output clean; requests are recorded instead
        pass
