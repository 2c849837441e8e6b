"""A test double of the Hugging Face Hub's HTTP protocol, for testing `hashmoe push` with the real
`huggingface_hub` client (the Hub itself cannot be reached from CI).

It is not a Hub: it is a small stdlib `http.server` on 127.0.0.1 (random port, one thread per request) that
answers the requests `huggingface_hub` 2.x sends for the calls hashmoe makes and for downloads, with the
status codes, JSON shapes and headers the client parses. Files live content-addressed in a temporary folder;
repositories, branches and commits in memory. Every request is checked against a set of bearer tokens
(`Authorization: Bearer ...`): a wrong token gets 401, as on the Hub.

Endpoints implemented (model repos; datasets/spaces answer the same way under their prefix):
    GET  /api/whoami-v2                                   who the token belongs to
    POST /api/repos/create                                409 with `url` when it exists; 403 outside your namespace
    POST /api/validate-yaml                               README front matter: must parse, be a mapping, and
                                                          license/tags/datasets/model-index have the right types
    POST /api/models/{repo}/branch/{branch}               create a branch (409 if it exists)
    POST /api/models/{repo}/preupload/{rev}               upload mode per file (lfs for LFS-tracked patterns in
                                                          .gitattributes or >= 10 MB) and the remote oid
    POST /{repo}.git/info/lfs/objects/batch               LFS batch API, `basic` transfer, signed upload URL
    PUT  /_lfs/{sha256}?sig=...                           the upload itself (the client sends no token here,
                                                          as with S3); size and sha256 are verified
    POST /api/models/{repo}/commit/{rev}                  NDJSON: header, file (base64), lfsFile, deletedFile,
                                                          deletedFolder; parentCommit checked
    GET  /api/models/{repo}[/revision/{rev}]              repo info: sha, siblings, private, ...
    GET  /api/models/{repo}/tree/{rev}[/{path}]           ?recursive=; files with oid, size and lfs info
    HEAD/GET /[datasets/]{repo}/resolve/{rev}/{path}      X-Repo-Commit, ETag (sha256 for LFS, git oid else),
                                                          X-Linked-Size/-Etag; 404s carry X-Error-Code; one
                                                          `Range: bytes=a-b` (or `-n`) answered 206 with
                                                          Content-Range, as parquet readers ask

Answered 404 on purpose (the client treats the registry as absent): GET /api/agent-harnesses, which the client
fetches to name AI-agent harnesses in its user agent.

Not implemented: Xet storage (clients must run with HF_HUB_DISABLE_XET=1), multipart LFS uploads, pull
requests, tags, pagination (one page is returned), multi-range requests, gated repos, organisations, rate limits,
the real Hub's full metadata schema, and anything else: such requests get 404 and are recorded in
`HubServer.unhandled`, so a test can assert the client needed nothing more.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files this large in LFS whatever their name
# What the Hub's first commit writes (abridged): the patterns stored in LFS.
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.bin", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.zip", "*.png",
    "*tfevents*"))


def git_oid(data: bytes) -> str:
    """git's blob id (`git hash-object`): what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file of a commit: where its content sits in the blob store, and how git holds it."""

    sha256: str  # content address in the blob store (and the LFS oid)
    size: int
    lfs: bool
    content_oid: str  # git blob id of the content itself

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @property
    def oid(self) -> str:
        """The git blob id the Hub reports: of the pointer file for LFS files, as in git."""
        return git_oid(self.pointer) if self.lfs else self.content_oid


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict = field(default_factory=dict)  # name -> commit id
    commits: dict = field(default_factory=dict)  # commit id -> {path: Entry}
    messages: dict = field(default_factory=dict)  # commit id -> summary


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class HubServer:
    """`with HubServer(root, tokens={"hf_x": "alice"}) as hub:` then point the client at `hub.endpoint`."""

    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.upload_signatures: dict[str, str] = {}  # sha256 -> secret in the signed PUT URL
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.unhandled: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of every ranged download
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- storage --------------------------------------------------------------------------------------
    def store(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / sha256
        if not path.exists():
            path.write_bytes(data)
        return sha256

    def has_blob(self, sha256: str) -> bool:
        return (self.root / "blobs" / sha256).is_file()

    def read(self, entry: Entry) -> bytes:
        return (self.root / "blobs" / entry.sha256).read_bytes()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """For tests: every file of a revision, path -> content."""
        repo = self.repos[repo_id]
        return {path: self.read(e) for path, e in repo.commits[self.resolve_revision(repo, revision)].items()}

    def entry_for(self, data: bytes, lfs: bool) -> Entry:
        return Entry(sha256=self.store(data), size=len(data), lfs=lfs, content_oid=git_oid(data))

    def new_commit(self, repo: Repo, branch: str, tree: dict, summary: str) -> str:
        commit = hashlib.sha1(f"{branch}{len(repo.commits)}{secrets.token_hex(8)}".encode()).hexdigest()
        repo.commits[commit], repo.messages[commit], repo.branches[branch] = tree, summary, commit
        return commit

    def resolve_revision(self, repo: Repo, revision: str) -> str:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def is_lfs(self, tree: dict, path: str, size: int) -> bool:
        attributes = self.read(tree[".gitattributes"]).decode() if ".gitattributes" in tree else ""
        patterns = [line.split()[0] for line in attributes.splitlines() if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        return size >= LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p)
                                                 for p in patterns)


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, format, *args):  # quiet: pytest captures stderr
            pass

        # ---- plumbing ---------------------------------------------------------------------------------
        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
            data = raw if raw is not None else b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            if raw is None:
                self.send_header("Content-Type", "application/json")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def user(self, required: bool) -> str | None:
            """The token's user; 401 for a token the Hub does not know, and for none where one is needed."""
            header = self.headers.get("Authorization", "")
            if not header:
                if required:
                    raise HubError(401, "Invalid username or password.")
                return None
            token = header.removeprefix("Bearer ").strip()
            if token not in hub.tokens:
                raise HubError(401, "Invalid credentials in Authorization header")
            return hub.tokens[token]

        def repo(self, repo_id: str, write: bool = False) -> Repo:
            user = self.user(required=write)
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and user != repo.owner):  # the Hub hides private repos: 404
                raise HubError(404, "Repository not found", "RepoNotFound")
            if write and user != repo.owner:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
            return repo

        def dispatch(self):
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            hub.requests.append((self.command, url.path))
            try:
                with hub.lock:
                    handled = self.route(self.command, url.path, query)
                if not handled and url.path != "/api/agent-harnesses":
                    hub.unhandled.append((self.command, url.path))
                if not handled:
                    self.send(404, {"error": f"test double: {self.command} {url.path} is not implemented"})
            except HubError as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self.send(err.status, {"error": err.message, **err.extra}, headers)

        do_GET = do_POST = do_PUT = do_HEAD = dispatch

        # ---- routes -----------------------------------------------------------------------------------
        def route(self, method: str, path: str, query: dict) -> bool:
            parts = path.strip("/").split("/")
            if method == "GET" and path == "/api/whoami-v2":
                name = self.user(required=True)
                self.send(200, {"type": "user", "name": name, "orgs": [],
                                "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            elif method == "POST" and path == "/api/repos/create":
                self.create_repo(json.loads(self.body()))
            elif method == "POST" and path == "/api/validate-yaml":
                self.validate_yaml(json.loads(self.body())["content"])
            elif method == "PUT" and parts[0] == "_lfs":
                self.lfs_put(parts[1], query.get("sig", ""))
            elif method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                self.lfs_batch(path.strip("/").removesuffix(".git/info/lfs/objects/batch"), json.loads(self.body()))
            elif parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
                return self.api_repo(method, "/".join(parts[2:4]), parts[4:], query)
            elif method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                self.resolve("/".join(parts[:2]), parts[3], unquote("/".join(parts[4:])))
            elif method in ("GET", "HEAD") and len(parts) >= 6 and parts[0] in ("datasets", "spaces") \
                    and parts[3] == "resolve":
                self.resolve("/".join(parts[1:3]), parts[4], unquote("/".join(parts[5:])))
            else:
                return False
            return True

        def api_repo(self, method: str, repo_id: str, rest: list, query: dict) -> bool:
            if method == "GET" and not rest:
                self.repo_info(repo_id, "main")
            elif method == "GET" and rest[0] == "revision" and len(rest) == 2:
                self.repo_info(repo_id, rest[1])
            elif method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                self.tree(repo_id, rest[1], unquote("/".join(rest[2:])), query.get("recursive") in ("1", "true", "True"))
            elif method == "POST" and rest[0] == "preupload" and len(rest) == 2:
                self.preupload(repo_id, rest[1], json.loads(self.body()))
            elif method == "POST" and rest[0] == "commit" and len(rest) == 2:
                self.commit(repo_id, rest[1], self.body())
            elif method == "POST" and rest[0] == "branch" and len(rest) == 2:
                self.create_branch(repo_id, unquote(rest[1]), json.loads(self.body() or b"{}"))
            else:
                return False
            return True

        def create_repo(self, payload: dict):
            user = self.user(required=True)
            namespace = payload.get("organization") or user
            repo_id = f"{namespace}/{payload['name']}"
            url = f"{hub.endpoint}/{repo_id}"
            if namespace != user:
                raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
            if repo_id in hub.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
            repo = hub.repos[repo_id] = Repo(owner=user, private=private)
            hub.new_commit(repo, "main", {".gitattributes": hub.entry_for(GITATTRIBUTES.encode(), lfs=False)},
                           "initial commit")
            self.send(200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)})

        def validate_yaml(self, content: str):
            errors = []
            if content.startswith("---"):
                front = content.split("\n---", 1)[0].removeprefix("---")
                try:
                    metadata = yaml.safe_load(front)
                except yaml.YAMLError as err:
                    metadata, errors = None, [f"YAML front matter does not parse: {err}"]
                if not errors and not isinstance(metadata, dict):
                    errors.append("metadata must be a YAML mapping")
                elif not errors:
                    for key in ("license", "library_name", "pipeline_tag"):
                        if key in metadata and not isinstance(metadata[key], str):
                            errors.append(f'"{key}" must be a string')
                    for key in ("tags", "datasets", "language"):
                        value = metadata.get(key, [])
                        if not (isinstance(value, str) or (isinstance(value, list)
                                                          and all(isinstance(v, str) for v in value))):
                            errors.append(f'"{key}" must be a string or a list of strings')
                    errors += model_index_errors(metadata.get("model-index"))
            if errors:
                self.send(400, {"errors": [{"message": e} for e in errors], "warnings": []})
            else:
                self.send(200, {"errors": [], "warnings": []})

        def create_branch(self, repo_id: str, branch: str, payload: dict):
            repo = self.repo(repo_id, write=True)
            if branch in repo.branches:
                raise HubError(409, "Reference already exists")
            start = hub.resolve_revision(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start
            self.send(200, {})

        def preupload(self, repo_id: str, revision: str, payload: dict):
            repo = self.repo(repo_id, write=True)
            tree = repo.commits[hub.resolve_revision(repo, revision)]
            files = []
            for item in payload["files"]:
                lfs = hub.is_lfs(tree, item["path"], item["size"])
                remote = tree.get(item["path"])
                # The oid the client compares with its own: sha256 for LFS files, git blob id for regular ones.
                oid = None if remote is None else remote.sha256 if lfs else remote.oid
                files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": oid})
            self.send(200, {"files": files, "commitOid": repo.branches.get(unquote(revision), revision)})

        def lfs_batch(self, repo_id: str, payload: dict):
            repo_id = repo_id.removeprefix("datasets/").removeprefix("spaces/")
            self.repo(repo_id, write=True)
            objects = []
            for obj in payload["objects"]:
                answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if not hub.has_blob(obj["oid"]):  # already stored: no actions, the client skips the upload
                    signature = hub.upload_signatures.setdefault(obj["oid"], secrets.token_hex(16))
                    answer["actions"] = {"upload": {"href": f"{hub.endpoint}/_lfs/{obj['oid']}?sig={signature}",
                                                    "expires_in": 3600}}
                objects.append(answer)
            self.send(200, {"transfer": "basic", "objects": objects})

        def lfs_put(self, sha256: str, signature: str):
            data = self.body()
            if not signature or hub.upload_signatures.get(sha256) != signature:
                raise HubError(403, "upload URL signature does not match")
            if hashlib.sha256(data).hexdigest() != sha256:
                raise HubError(400, "uploaded content does not match its sha256")
            hub.store(data)
            self.send(200)

        def commit(self, repo_id: str, revision: str, body: bytes):
            repo = self.repo(repo_id, write=True)
            branch = unquote(revision)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
            parent = header.get("parentCommit")
            if parent and parent != repo.branches[branch]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[repo.branches[branch]])
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    tree[value["path"]] = hub.entry_for(base64.b64decode(value["content"]), lfs=False)
                elif line["key"] == "lfsFile":
                    if not hub.has_blob(value["oid"]):
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    data = (hub.root / "blobs" / value["oid"]).read_bytes()
                    tree[value["path"]] = hub.entry_for(data, lfs=True)
                elif line["key"] == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif line["key"] == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"unknown commit operation {line['key']!r}")
            commit = hub.new_commit(repo, branch, tree, header.get("summary", ""))
            self.send(200, {"success": True, "commitOid": commit, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit}",
                            "pullRequestUrl": None})

        def repo_info(self, repo_id: str, revision: str):
            repo = self.repo(repo_id)
            commit = hub.resolve_revision(repo, revision)
            now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
            self.send(200, {"id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": commit,
                            "private": repo.private, "disabled": False, "gated": False, "lastModified": now,
                            "createdAt": now, "tags": [], "downloads": 0, "likes": 0,
                            "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])]})

        def tree(self, repo_id: str, revision: str, folder: str, recursive: bool):
            repo = self.repo(repo_id)
            files = repo.commits[hub.resolve_revision(repo, revision)]
            prefix = folder.strip("/") + "/" if folder.strip("/") else ""
            entries, folders = [], set()
            for path in sorted(files):
                if not path.startswith(prefix):
                    continue
                rest = path[len(prefix):].split("/")
                for depth in range(1, len(rest)):  # the folders on the way
                    if recursive or depth == 1:
                        folders.add(prefix + "/".join(rest[:depth]))
                if recursive or len(rest) == 1:
                    entry = files[path]
                    item = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
                    if entry.lfs:
                        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(entry.pointer)}
                    entries.append(item)
            if prefix and not entries and not folders:
                raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
            entries += [{"type": "directory", "oid": git_oid(d.encode()), "size": 0, "path": d} for d in sorted(folders)]
            self.send(200, entries)

        def resolve(self, repo_id: str, revision: str, path: str):
            repo = self.repo(repo_id)
            commit = hub.resolve_revision(repo, revision)
            entry = repo.commits[commit].get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            etag = f'"{entry.sha256 if entry.lfs else entry.oid}"'
            headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "bytes"}
            if entry.lfs:
                headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(entry.size)})
            data = hub.read(entry)
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes=") and "," not in wanted:  # one range, as parquet readers ask
                hub.ranges.append((path, wanted))
                first, _, last = wanted[6:].partition("-")
                start = int(first) if first else max(0, len(data) - int(last))
                end = min(len(data) - 1, int(last) if first and last else len(data) - 1)
                if start >= len(data):
                    headers["Content-Range"] = f"bytes */{len(data)}"
                    self.send(416, headers=headers, raw=b"")
                    return
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                self.send(206, headers=headers, raw=data[start:end + 1])
                return
            self.send(200, headers=headers, raw=data)

    return Handler


def model_index_errors(model_index) -> list[str]:
    """The shape the Hub requires of `model-index` (a list of {name, results: [{task, metrics: [...]}]})."""
    if model_index is None:
        return []
    if not isinstance(model_index, list):
        return ['"model-index" must be a list']
    errors = []
    for model in model_index:
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append('"model-index[].name" must be a string')
            continue
        for result in model.get("results") or []:
            if not isinstance(result.get("task"), dict) or not isinstance(result["task"].get("type"), str):
                errors.append('"model-index[].results[].task.type" must be a string')
            for metric in result.get("metrics") or []:
                if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), (int, float, str)):
                    errors.append('"model-index[].results[].metrics[]" needs a string type and a value')
    return errors
