"""Push a converted directory to the Hugging Face Hub, with a generated model card as README.md.

One commit holds every file of the output directory plus the card, so a repository never shows half a model. The
commit goes through `HfApi.create_commit`: files the Hub already holds unchanged are skipped, and large files whose
content reached the Hub's storage before a failure are not sent again, so re-running a failed push continues it.
The token is resolved here and only ever handed to huggingface_hub; it is never printed, logged or put in a message.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from .. import __version__
from .. import constants as C
from ..errors import LplrError, opt
from ..io.manifest import Manifest, read_manifest
from ..io.network import hub_timeout, is_timeout, network_timeout, timeout_hint
from .card import build_model_card

__all__ = ["check_repo_id", "push"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SKIP_SUFFIXES = (C.PARTIAL_SUFFIX,)
_SKIP_NAMES = {C.PROGRESS_FILE, C.MODEL_CARD}  # the card replaces any README.md copied from the source
_TOKEN_FIX = "pass --token, set HF_TOKEN, or run `hf auth login`"


def push(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, dry_run: bool = False,
         base_model: str | None = None) -> dict:
    """Upload a finished conversion in `out_dir` to the Hub model repo `repo_id` (created if missing).

    The token comes from `token`, else HF_TOKEN, else the huggingface_hub login cache; the endpoint from HF_ENDPOINT.
    `dry_run` prints every file with its size and the model card, sends nothing, and returns the same listing.
    `base_model` overrides the base model (Hub repo id) the card names; by default the manifest's.
    Returns {"repo_id", "url" (of the repo), "revision", "commit_id", "commit_url", "files": [{"path", "bytes"}],
    "total_bytes", "dry_run", ...}; a dry run returns "card" and "token_source" instead of url and commit.
    Raises LplrError (one line naming the fix) for an unfinished conversion, a missing or rejected token, an
    unreachable Hub, or an upload the Hub refused.
    """
    from ..io.outdir import OutputLock

    out_dir = Path(out_dir)
    read_manifest(out_dir)  # a finished conversion, before the lock creates anything in it
    check_repo_id(repo_id)
    if base_model is not None:
        check_repo_id(base_model, what=opt("base_model"))
    with OutputLock.reading(out_dir):  # one conversion, whole: no convert --overwrite, eval or report meanwhile
        return _push(out_dir, repo_id, private, revision, commit_message, token, dry_run, base_model)


def _push(out_dir: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
          token: str | None, dry_run: bool, base_model: str | None) -> dict:
    manifest = Manifest.from_json(read_manifest(out_dir))
    scan = _Scan(_known_token(token))  # the listed files' sha256 and the token search in one read of each
    files = _files_to_upload(out_dir, manifest, scan)
    card_text = str(build_model_card(out_dir, repo_id=repo_id, base_model=base_model))
    card_bytes = card_text.encode("utf-8")
    listing = [{"path": rel, "bytes": path.stat().st_size} for rel, path in files]
    listing.append({"path": C.MODEL_CARD, "bytes": len(card_bytes)})
    result = {"repo_id": repo_id, "revision": revision or "main", "private": private, "files": listing,
              "total_bytes": sum(f["bytes"] for f in listing), "endpoint": _endpoint()}

    sent = {opt("commit_message"): commit_message, opt("revision"): revision, "the repo id": repo_id}
    if dry_run:
        return _dry_run(out_dir, manifest, files, card_text, token, result, scan, sent)

    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.is_offline_mode():
        raise LplrError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset HF_HUB_OFFLINE (and "
                        f"TRANSFORMERS_OFFLINE) to push, or pass {opt('dry_run')} to only list what would be sent")
    token = _resolve_token(token)
    _refuse_leaked_token(out_dir, files, card_bytes, token, scan, sent)
    _refuse_unlisted(out_dir, manifest)

    api = HfApi(endpoint=result["endpoint"], token=token, library_name=C.TOOL_NAME, library_version=__version__)
    with hub_timeout(), _hub_errors(result["endpoint"], repo_id, token):
        api.whoami(token=token)  # fail early, before any upload, on a token the Hub rejects
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if private and api.repo_info(repo_id, repo_type="model").private is False:
            raise LplrError(f"{repo_id} already exists and is public, so {opt('private')} cannot apply; make it "
                            f"private "
                            f"in its settings on the Hub first, or push without {opt('private')}")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        operations.append(CommitOperationAdd(path_in_repo=C.MODEL_CARD, path_or_fileobj=card_bytes))
        logger.info(f"pushing {len(operations)} files ({human_bytes(result['total_bytes'])}) to {repo_id}")
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message or
                                 _default_message(manifest), revision=revision, repo_type="model")
    result.update(dry_run=False, url=str(repo_url), commit_id=info.oid, commit_url=info.commit_url)
    logger.info(f"pushed {repo_id}: {info.commit_url}")
    return result


def _dry_run(out_dir: Path, manifest: Manifest, files: list[tuple[str, Path]], card_text: str, token: str | None,
             result: dict, scan: _Scan, sent: dict[str, str | None]) -> dict:
    """Print what a push would send and return the listing; what the real push would refuse for a token found in a
    file, the dry run refuses too (when a token is known)."""
    known = _known_token(token)
    if known:
        _refuse_leaked_token(out_dir, files, card_text.encode("utf-8"), known, scan, sent)
    _refuse_unlisted(out_dir, manifest)
    result.update(dry_run=True, card=card_text, token_source=_token_source(token))
    print(_dry_run_text(result))
    return result


def _refuse_leaked_token(out_dir: Path, files: list[tuple[str, Path]], card: bytes, token: str, scan: _Scan,
                         sent: dict[str, str | None] | None = None) -> None:
    """Refuse to publish any file (or the card) that contains the token, e.g. in a recorded command line or a log.
    Every file to upload is scanned, whatever its suffix or size (a file `scan` read already is not read again); its
    name, and every other text the push sends (`sent`: commit message, revision, repo id), must not hold it either."""
    needle = token.encode("utf-8")
    named = [what for what, text in (sent or {}).items() if text and token in text]
    named += [f"the file name {rel.replace(token, '<token>')!r}" for rel, _ in files if token in rel]
    if named:
        raise LplrError(f"{named[0]} contains your Hub token, so it must not be published; remove the token from it "
                        f"(and revoke the token if it was shared), then push again")
    leaks = ["the generated model card"] if needle in card else []
    leaks += [str(path) for _, path in files if scan.contains(path, needle)]
    if leaks:
        raise LplrError(f"{', '.join(leaks)} contains your Hub token, so it must not be published; remove the token "
                        f"from {out_dir} (and revoke it if it was shared), then push again")


def _file_contains(path: Path, needle: bytes | None, chunk: int = 1 << 24, digest=None) -> bool:
    """Whether `needle` occurs in the file, read in chunks that overlap by len(needle) - 1 bytes, so an occurrence
    split across two chunks is found; `digest` (a hashlib object), when given, is fed the whole file on the way."""
    keep = len(needle) - 1 if needle else 0
    tail, found = b"", False
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if digest is not None:
                digest.update(block)
            if needle and not found:
                window = tail + block
                found = needle in window
                tail = window[-keep:] if keep else b""
            if found and digest is None:
                break
    return found


class _Scan:
    """sha256 of a file and the search for `needle` (the token a push would use, if known) in one read; remembers
    what it found, so that the token check reads only files the hashing did not."""

    def __init__(self, token: str | None):
        self.needle = token.encode("utf-8") if token else None
        self.found: dict[Path, bool] = {}

    def sha256(self, path: Path) -> str:
        digest = hashlib.sha256()
        self.found[path] = _file_contains(path, self.needle, digest=digest)
        return digest.hexdigest()

    def contains(self, path: Path, needle: bytes) -> bool:
        if needle == self.needle and path in self.found:
            return self.found[path]
        return _file_contains(path, needle)


def check_repo_id(repo_id: str, what: str | None = None) -> None:
    """A Hub model repo id OWNER/NAME, or an LplrError naming the option (`what`, default the repo id option)."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id \
            or len(repo_id.split("/")[1]) > 96:
        raise LplrError(f"repo id {repo_id!r} is not of the form OWNER/NAME (letters, digits, '-', '_', '.'); "
                        f"pass e.g. {what or opt('repo_id')} my-user/my-model-lplr")


def _files_to_upload(out_dir: Path, manifest: Manifest, scan: _Scan) -> list[tuple[str, Path]]:
    """(path in repo, path on disk) of every file to upload, sorted: the manifest and what it lists (shards, side
    files, the report's files), every one there unchanged (sha256, by `scan`). A file the manifest does not list (added
    after the conversion, e.g. another model's weights) refuses the push, and no entry may be a symbolic link (a link
    could make the upload read outside the output). Hidden entries and a README.md (the card replaces it) are not
    uploaded."""
    from ..verify import file_problems

    problems = file_problems(out_dir, manifest, scan.sha256)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LplrError(f"{out_dir}: {problems[0]}{more}; the output was changed after the conversion, so it is not "
                        f"pushed: re-run the conversion with {opt('overwrite')}")
    files = []
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        if path.is_symlink():
            raise LplrError(f"{path} is a symbolic link (to {path.resolve()}); push uploads no link, which could "
                            f"publish a file from outside {out_dir}: put the file itself there, or remove the link")
        if not path.is_file() or rel in _SKIP_NAMES or rel.endswith(_SKIP_SUFFIXES):
            continue
        files.append((rel, path))
    return files


def _refuse_unlisted(out_dir: Path, manifest: Manifest) -> None:
    """A file the manifest does not list (added after the conversion: another model's weights, notes) is not
    published beside the model; checked after the token scan, which names a token in any file first."""
    from ..verify import unlisted_files

    unlisted = [rel for rel in unlisted_files(out_dir, manifest)[0]
                if rel not in _SKIP_NAMES and not rel.endswith(_SKIP_SUFFIXES)]
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        fix = f"run `lplr-convert report --in-path {out_dir}` to list it again" if unlisted[0] in C.OWN_FILES else \
            "move it out of the directory"
        raise LplrError(f"{out_dir}: {unlisted[0]}{more} is not a file of the conversion ({C.MANIFEST_FILE} does not "
                        f"list it), so the push would publish it beside the model; {fix}")


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _token_source(token: str | None) -> str | None:
    """Where the token would come from (never the token itself), or None when there is none."""
    if token:
        return "--token"
    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    from huggingface_hub import get_token

    return "login cache" if get_token() else None


def _known_token(token: str | None) -> str | None:
    """The token a push would use (argument, HF_TOKEN, login cache), or None; never an error."""
    if token or os.environ.get("HF_TOKEN"):
        return token or os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def _resolve_token(token: str | None) -> str:
    known = _known_token(token)
    if not known:
        raise LplrError(f"no Hugging Face token found; {_TOKEN_FIX} (the token needs write access)")
    return known


def _default_message(manifest: Manifest) -> str:
    methods = sorted({t.method for t in manifest.tensors if t.method != "copy"})
    return f"Upload {'/'.join(methods) or 'converted'} model made with {C.TOOL_NAME} {__version__}"


def _dry_run_text(result: dict) -> str:
    where = f"{result['repo_id']} (revision {result['revision']}, {'private' if result['private'] else 'public'})"
    width = max(len(f["path"]) for f in result["files"]) + 2
    lines = [(f"Dry run: would push {len(result['files'])} files ({human_bytes(result['total_bytes'])}) to "
              f"{where} at {result['endpoint']}; nothing was sent.")]
    for f in result["files"]:
        note = "  (generated model card)" if f["path"] == C.MODEL_CARD else ""
        lines.append(f"  {f['path']:<{width}}{human_bytes(f['bytes']):>12}{note}")
    source = result["token_source"]
    lines.append(f"Token: found ({source})." if source else f"Token: none found; {_TOKEN_FIX} before pushing.")
    lines += [f"----- {C.MODEL_CARD} -----", result["card"].rstrip(), "-----"]
    return "\n".join(lines)


@contextmanager
def _hub_errors(endpoint: str, repo_id: str, token: str):
    """Turn what the Hub client raises into one-line LplrErrors naming the fix (the token is scrubbed)."""
    try:
        yield
    except LplrError:
        raise
    except Exception as e:
        message = _explain(e, endpoint, repo_id)
        if message is None and not any(token in str(x) or token in repr(getattr(x, "args", ()))
                                       for x in _chain(e)):
            raise
        if message is None:
            message = f"the push to {repo_id} failed ({type(e).__name__}); re-run it, or report this as a bug"
        # never chained: a server's error body may echo the request's headers, token included (--debug prints the
        # chain)
        raise LplrError(" ".join(message.replace(token, "<token>").split())) from None


def _explain(exc: BaseException, endpoint: str, repo_id: str) -> str | None:
    """A one-line explanation of a failed Hub call, or None for errors that are not about the Hub (bugs)."""
    from huggingface_hub.errors import HfHubHTTPError

    again = "then re-run the same push to continue (files already on the Hub are skipped)"
    if is_timeout(exc):
        return f"the Hub at {endpoint} stopped answering: {timeout_hint(network_timeout())}; check the network or " \
               f"HF_ENDPOINT, {again}"
    for e in _chain(exc):
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            status = e.response.status_code
            said = _first_line(getattr(e, "server_message", None) or "")
            said = f": {said}" if said else ""
            if status == 401:
                return (f"the Hub at {endpoint} rejected the token (401 Unauthorized{said}); {_TOKEN_FIX} "
                        f"with a valid token")
            if status == 403:
                return (f"the token may not write to {repo_id} (403 Forbidden{said}); use a token with write access "
                        f"to the {repo_id.split('/')[0]} namespace, or push to a repo you own")
            return f"the Hub refused the push to {repo_id} (HTTP {status}{said}); {again}"
        names = {cls.__name__ for cls in type(e).__mro__}
        if names & {"ConnectError", "ConnectionError", "TransportError", "TimeoutException", "NetworkError",
                    "Timeout", "ConnectTimeout"}:
            return f"cannot reach the Hub at {endpoint} ({type(e).__name__}); check the network or HF_ENDPOINT, {again}"
    if isinstance(exc, ValueError) and "README.md" in str(exc):
        return f"the Hub rejected the model card metadata ({_first_line(str(exc))}); please report this as a bug"
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def human_bytes(n: int) -> str:
    """1234567 -> "1.23 MB"."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."
