"""Output-directory policy for every command that writes: where an output may go, the exclusive lock of a run, and
what `--overwrite` may delete (only the files an earlier output of this tool lists as its own, never anything else).

Every check runs before anything is deleted or written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import constants as C
from ..errors import LplrError, opt

# A shard under its temporary name (written, not yet recorded in the journal when a run was killed).
_TEMP_SHARD = re.compile(re.escape(C.PARTIAL_SHARD_TEMPLATE.removesuffix(C.PARTIAL_SUFFIX)).replace(
    re.escape("{index:05d}"), r"\d{5}"))

__all__ = ["OutputLock", "Resumable", "check_paths", "check_replaceable", "clear_listed", "entries", "listed_files",
           "output_path", "owning_output", "prepare_output", "recorded_files", "replaceable_output", "resumable_when_full"]


def output_path(value, what: str = "out_path") -> Path:
    """The output directory a command was given (`~` expanded); an empty one (which would mean the current
    directory) is an LplrError."""
    if value is None or not str(value).strip():
        raise LplrError(f"{opt(what)} is empty; pass the directory to write, e.g. {opt(what)} ./model-lplr")
    return Path(value).expanduser()


def check_paths(src_root: Path, out: Path, what: str = "out_path") -> None:
    """`out` must neither be, nor lie inside, nor contain the input `src_root` (symlinks resolved), and must be a
    directory (or not exist yet)."""
    out_r, src_r = out.resolve(), src_root.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise LplrError(f"{opt(what)} {out} is inside the input {src_root}; choose a directory outside the source")
    if out_r in src_r.parents:
        raise LplrError(f"{opt(what)} {out} contains the input {src_root}; choose a separate directory")
    if out.exists() and not out.is_dir():
        raise LplrError(f"{opt(what)} {out} exists and is not a directory; choose a directory path")
    owner = owning_output(out_r.parent)
    if owner is not None:
        raise LplrError(f"{opt(what)} {out} lies inside {owner}, an output directory of lplr-convert (its files "
                        f"would join that output, and a push of it would publish them); choose a directory outside it")




def owning_output(path: Path) -> Path | None:
    """The nearest of `path` (resolved) and its parents that holds a record of this tool (a conversion, an
    interrupted one, an export or decompress, a STATS directory), or None."""
    path = path.resolve()
    return next((d for d in (path, *path.parents) if any((d / n).is_file() for n in C.MARKER_FILES)), None)


def entries(out: Path) -> list[str]:
    """Every file below `out` (relative, posix), the lock file excluded; directories are not entries."""
    found = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if rel != C.LOCK_FILE and (p.is_file() or p.is_symlink()):
            found.append(rel)
    return found


def _progress(out: Path) -> dict | None:
    """The journal of an interrupted run in `out`, or None when there is none or it is not one this tool wrote (its
    fingerprint a mapping, its shards under the writer's temporary names, its files plain names inside `out`)."""
    from .manifest import is_plain_name

    path = out / C.PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(journal, dict) or not isinstance(journal.get("fingerprint"), dict):
        return None
    shards, files = journal.get("shards"), journal.get("files") or []
    if not isinstance(shards, list) or not isinstance(files, list):
        return None
    if not all(isinstance(s, dict) and _TEMP_SHARD.fullmatch(str(s.get("temp_name"))) for s in shards) or \
            not all(is_plain_name(f) for f in files):
        return None
    return journal


def listed_files(out: Path) -> set[str] | None:
    """The files an earlier run of this tool wrote in `out`, by its own record: the complete manifest's shards and
    files plus the tool's own files, or an interrupted run's journal (finished shards, partial files, announced
    files). None when `out` holds no valid record of ours."""
    from .manifest import read_manifest

    partial = {e for e in entries(out) if "/" not in e and (e.endswith((C.PARTIAL_SUFFIX, C.DATA_SUFFIX))
                                                           or _TEMP_SHARD.fullmatch(e))}
    journal = _progress(out)
    if journal is not None:
        shards = {str(s.get("temp_name")) for s in journal["shards"]}
        return shards | partial | {str(f) for f in journal.get("files") or []} | set(C.OWN_FILES)
    if not (out / C.MANIFEST_FILE).is_file():
        return None
    try:
        manifest = read_manifest(out)
    except LplrError:
        return None
    return set(manifest.get(C.M_SHARDS) or {}) | set(manifest.get(C.M_FILES) or {}) | set(C.OWN_FILES) | partial


def _foreign(out: Path, listed: set[str]) -> list[str]:
    return [e for e in entries(out) if e not in listed]


def clear_listed(out: Path, listed: Iterable[str], why: str) -> None:
    """Delete the files of `listed` that lie below `out` (and directories left empty); refuse, deleting nothing, when
    `out` holds any file that is not listed. Only entries found by walking `out` (links not followed) are deleted:
    a record naming `../x` or an absolute path never reaches outside `out`."""
    foreign = _foreign(out, set(listed))
    if foreign:
        raise LplrError(f"{out} holds {len(foreign)} file(s) that {why} does not list (first: {foreign[0]}), so "
                        f"{opt('overwrite')} will not delete them; move them away or choose another directory")
    for rel in entries(out):
        (out / rel).unlink()
    for d in sorted((p for p in out.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()


def prepare_output(src_root: Path, out: Path, *, overwrite: bool, resume: bool) -> None:
    """Check `out` for a conversion and, with `overwrite`, remove the earlier output of this tool that it holds.

    An empty or new directory is always fine. A non-empty one needs `resume` (and must then hold only an interrupted
    run of this tool) or `overwrite` (and must then hold only a finished or interrupted output of this tool, whose
    own record lists every file in it).
    """
    check_paths(src_root, out)
    if overwrite and out.is_symlink():
        raise LplrError(f"{opt('out_path')} {out} is a symbolic link; {opt('overwrite')} does not delete through "
                        f"links, pass the real directory {out.resolve()}")
    if not out.is_dir() or not entries(out):
        return
    listed = listed_files(out)
    if resume:
        if _progress(out) is None:
            done = listed is not None  # no journal: a record of ours is a finished output's valid manifest
            raise LplrError(f"{opt('out_path')} {out} " + ("already holds a finished conversion; use "
                            f"{opt('overwrite')} to redo it" if done else "is not an interrupted lplr-convert run "
                            "(no progress journal); choose an empty directory, or pass the directory of the run "
                            "to resume"))
        _check_only_listed(out, listed, "the interrupted run's journal")
        return
    if not overwrite:
        raise LplrError(f"{opt('out_path')} {out} is not empty; pass {opt('overwrite')} to replace it or "
                        f"{opt('resume')} to continue an interrupted conversion")
    if listed is None:
        raise LplrError(f"{opt('out_path')} {out} is not empty and is not an lplr-convert output, so "
                        f"{opt('overwrite')} will not delete it; choose an empty or new directory")
    clear_listed(out, listed, "the earlier output's manifest")


def _check_only_listed(out: Path, listed: set[str], why: str) -> None:
    foreign = _foreign(out, listed)
    if foreign:
        raise LplrError(f"cannot resume in {out}: it holds {len(foreign)} file(s) that {why} does not list (first: "
                        f"{foreign[0]}), and a resumed output would include them; move them away")


class OutputLock:
    """An exclusive lock on an output directory for the whole run (flock on a lock file inside it), naming its
    holder. A second run on the same directory gets a one-line error instead of corrupting the first. The lock file
    is removed when the run succeeds, or fails having written nothing (then a directory the run made goes too); a
    run that fails after writing, or is killed, leaves it, and the next run takes it over. flock is
    local to one machine: on a network file system two machines are not kept apart."""

    def __init__(self, out: Path, shared: bool = False):
        self.out, self._fd, self.created, self.made_dir, self.shared = out, None, False, False, shared

    @classmethod
    @contextlib.contextmanager
    def reading(cls, out: Path):
        """A shared lock for a command that reads a whole output and must see one conversion (push): no conversion,
        export or update of `out` starts meanwhile (nor does this start during one); readers share it. Where the lock
        file cannot be made (a read-only directory), no one can write there either, and none is taken."""
        lock = cls(out, shared=True)
        try:
            lock.__enter__()
        except _ReadOnly:
            yield None
            return
        try:
            yield lock
        finally:
            lock.__exit__(None, None, None)

    @classmethod
    @contextlib.contextmanager
    def guarding(cls, out: Path, src_root: Path, prepare: Callable[[], None]):
        """Check the paths, take the lock, then call `prepare` (which checks and clears `out`) under it. When the
        directory is refused, the lock file this run created is removed again, so a refused directory is left as it
        was."""
        check_paths(src_root, out)
        with cls(out) as lock:
            try:
                prepare()
            except LplrError:
                lock.discard()
                raise
            yield lock

    @classmethod
    @contextlib.contextmanager
    def updating(cls, out: Path):
        """The lock of a command that rewrites files inside an existing output (eval's record, a re-rendered
        report): no conversion, export or other update of `out` runs meanwhile. Its lock file goes in any case."""
        with cls(out) as lock:
            try:
                yield lock
            finally:
                lock.discard()

    def discard(self) -> None:
        """Remove the lock file if this run created it (the lock itself is released on exit)."""
        if self.created:
            (self.out / C.LOCK_FILE).unlink(missing_ok=True)

    def __enter__(self):
        if self.shared and not self.out.is_dir():
            raise LplrError(f"{self.out} is not a directory; pass the output directory of an lplr-convert run")
        try:
            self.made_dir = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LplrError(f"{opt('out_path')} {self.out} cannot be created ({e.strerror or e}); choose a directory "
                            f"path you can write to") from None
        for _ in range(8):  # the holder may finish (and remove the file) between our open and our flock
            fd = self._locked_fd(self.out / C.LOCK_FILE)
            if fd is not None:
                break
        else:
            raise LplrError(f"{self.out} is being written by other runs one after another; wait for them to finish "
                            f"or choose another output directory")
        self._fd = fd
        with contextlib.suppress(OSError):  # the holder's name is a courtesy: a full disk must not leak the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}{', reading' if self.shared else ''}".encode(), 0)
        return self

    def _locked_fd(self, path: Path) -> int | None:
        """A descriptor of `path` holding its flock, or None when the file was replaced meanwhile (try again)."""
        existed = path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a run that failed having written nothing removed the directory it made: again
            self.out.mkdir(parents=True, exist_ok=True)
            return None
        except OSError as e:
            if self.shared and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise _ReadOnly() from None
            raise LplrError(f"{opt('out_path')} {self.out} is not writable ({e.strerror or e}); choose a directory "
                            f"you can write to") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                if self.shared:
                    raise LplrError(f"{self.out} is being written by another run ({holder}); wait for it to finish, "
                                    f"then run this again") from None
                raise LplrError(f"{self.out} is being written by another run ({holder}); wait for it to finish or "
                                f"choose another output directory") from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        self.created = not existed
        return fd

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        if self.shared:  # the lock file goes only when no other reader holds it (and this one made it)
            try:
                if self.created:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    (self.out / C.LOCK_FILE).unlink(missing_ok=True)
            except OSError:
                pass
            finally:
                os.close(self._fd)
                self._fd = None
            return
        # A finished output carries no file of the lock's, nor does a failed run that wrote nothing (its directory
        # goes too when this run made it); a failed run that wrote something keeps it, for the next run to take over.
        nothing = False
        try:
            nothing = exc[0] is not None and all(p.name == C.LOCK_FILE for p in self.out.iterdir())
            if exc[0] is None or nothing:
                (self.out / C.LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            nothing = False
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None
        if nothing and self.made_dir:
            with contextlib.suppress(OSError):  # another run may have put something there since
                self.out.rmdir()


class _ReadOnly(Exception):
    """The lock file of a shared lock cannot be made: the directory is read-only."""


@dataclass(frozen=True)
class Resumable:
    """How a run that can be resumed marks its output: `journal` while interrupted, `record` once finished; `resume`
    asks to continue the interrupted run."""

    journal: str
    record: str
    resume: bool = False


def replaceable_output(src_root: Path, out: Path, overwrite: bool, previous: Callable[[Path], set[str] | None],
                       what: str, resumable: Resumable | None = None):
    """Check the paths, lock `out` and make it writable (a context manager): new or empty, or with `overwrite`
    holding only an earlier `what` whose files `previous(out)` lists (exactly those are deleted; anything else there
    refuses the run). With `resumable`, a directory holding its journal is an interrupted run: a plain run is
    refused naming both ways on, and `resumable.resume` continues it (and is refused anywhere else)."""
    return OutputLock.guarding(out, src_root, lambda: _prepare_replaceable(out, overwrite, previous, what, resumable))


def check_replaceable(src_root: Path, out: Path, overwrite: bool, previous: Callable[[Path], set[str] | None],
                      what: str, resumable: Resumable | None = None) -> None:
    """What `replaceable_output` would refuse, refused now, without locking, creating or deleting anything: for a
    command that has long work to do before it takes its output (calibrate hashes the source and runs the
    embeddings first). `replaceable_output` checks again under the lock."""
    check_paths(src_root, out)
    _prepare_replaceable(out, overwrite, previous, what, resumable, clear=False)


def _prepare_replaceable(out: Path, overwrite: bool, previous: Callable[[Path], set[str] | None], what: str,
                         resumable: Resumable | None, clear: bool = True) -> None:
    if not out.is_dir() or not entries(out):
        return
    interrupted = resumable is not None and (out / resumable.journal).is_file()
    if resumable is not None and resumable.resume:
        _check_resumable(out, previous, what, resumable, interrupted)
        return
    if not overwrite:
        if interrupted:
            raise LplrError(f"{opt('out_path')} {out} holds an interrupted run writing {what}; pass {opt('resume')} "
                            f"to continue it or {opt('overwrite')} to start again")
        raise LplrError(f"{opt('out_path')} {out} is not empty; pass {opt('overwrite')} to replace an earlier {what} "
                        f"or choose an empty directory")
    if out.is_symlink():
        raise LplrError(f"{opt('out_path')} {out} is a symbolic link; {opt('overwrite')} does not delete through "
                        f"links, pass the real directory {out.resolve()}")
    listed = previous(out)
    if listed is None:
        raise LplrError(f"{opt('out_path')} {out} is not empty and holds no earlier {what}, so {opt('overwrite')} "
                        f"will not delete it; choose an empty directory")
    if clear:
        clear_listed(out, listed, f"an earlier {what} of this output")


def _check_resumable(out: Path, previous: Callable[[Path], set[str] | None], what: str, resumable: Resumable,
                     interrupted: bool) -> None:
    """`out` (not empty) holds an interrupted run's journal and nothing but that run's files."""
    if interrupted:
        _check_only_listed(out, previous(out) or set(), "the interrupted run's journal")
    elif (out / resumable.record).is_file():
        raise LplrError(f"{opt('out_path')} {out} already holds finished {what} ({resumable.record}); nothing to "
                        f"resume: use it, or pass {opt('overwrite')} instead of {opt('resume')} to redo it")
    else:
        raise LplrError(f"{opt('out_path')} {out} is not an interrupted run writing {what} (no {resumable.journal}); "
                        f"choose an empty directory, or pass the directory of the run to resume")


def recorded_files(record: Path) -> set[str] | None:
    """The files a record of this tool (JSON whose "files" is a list or mapping of names) says were written beside
    it, plus the record itself; None when the record is missing or unreadable, or names anything but a plain file
    inside its directory (then it is not a record this tool wrote)."""
    from .manifest import is_plain_name

    try:
        files = json.loads(record.read_text(encoding="utf-8"))[C.M_FILES]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(files, (list, dict)) or not all(is_plain_name(f) for f in files):
        return None
    return {str(f) for f in files} | {record.name}


@contextlib.contextmanager
def resumable_when_full(out, record: str):
    """Turn a write into `out` that fails for want of space (full disk, file size limit, quota) into a one-line error:
    the output is incomplete (no `record`), free space and resume."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise LplrError(f"writing {out} failed ({os.strerror(e.errno)}); the output is left incomplete (no {record}): "
                        f"free disk space, then re-run with {opt('resume')}") from None
