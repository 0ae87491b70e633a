"""All-or-nothing replacement of a set of files in a directory (a two-phase rename).

A save of the files F into directory D:

1. writes every file of F under the hidden staging directory D/.himoe-save/ and fsyncs it;
2. writes D/.himoe-save/manifest.json (path, size, sha256 of every file, and the step)
   through a temporary name: that rename is the commit point;
3. moves every staged file to its place in D, deletes the .pt files the previous manifest
   listed that F no longer has (weights or a train state that would no longer match; other
   files, e.g. metrics.jsonl, are history and stay), moves the manifest to D/manifest.json
   last, then removes the staging directory.

A crash before step 2 leaves D as the previous complete save plus a staging directory
without a manifest: recovery deletes it (roll back). A crash after step 2 leaves a staging
manifest: recovery finishes step 3 (roll forward), which is safe to repeat. So D's layout
stays exactly the card's and a reader always ends up with one complete save.

An exclusive flock on D itself (no extra file) is held while saving and while recovering,
so a reader never mistakes a save in progress for an interrupted one; the kernel drops the
lock when the process dies, even on SIGKILL.

A second, long lock keeps two writers apart: a command that changes D (train, experts
add/swap/quantize) holds an exclusive, non-blocking flock on D/.himoe-lock for its whole
run (WriterLock), and a second writer stops at once with the holder's pid. Readers never
take it, so generate and verify work while a model trains. The file stays (an empty file;
a command that fails changes nothing), and the lock of a killed process dies with it.

Every path inside D and inside the staging directory goes through safe_path: a staged save
is completed only when each of its files is a plain file inside D that matches the
staged manifest, so a planted one can neither move a file in from elsewhere nor delete any.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from himoe.checkpoint import manifest as mf
from himoe.checkpoint import safe_path
from himoe.errors import UserError

STAGING_DIR = ".himoe-save"
LOCK_FILE = ".himoe-lock"
# Test hook for the crash-safety tests: HIMOE_TEST_SLOW_SAVE=<seconds> sleeps that long after
# each file is staged and after each file is moved into place, so that a SIGKILL can land
# inside a save. Unset (the normal case) it costs nothing.
SLOW_SAVE_ENV = "HIMOE_TEST_SLOW_SAVE"

Writer = Callable[[BinaryIO], None]
STALE_SUFFIXES = (".pt",)  # files of an older save that a new save without them deletes


def _pause() -> None:
    delay = os.environ.get(SLOW_SAVE_ENV)
    if delay:
        time.sleep(float(delay))


def fsync_dir(path: Path) -> None:
    """Make the names in a directory durable; not every platform lets a directory be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(directory: Path):
    """Exclusive lock on `directory` (which must exist). Best effort: a platform or file
    system without flock runs unlocked rather than not at all."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class WriterLock:
    """The lock of the one process that may write to a directory, held from acquire() to
    release() (or the process's end). Re-entrant within a process. create: make the
    directory if it is missing; a directory made here that still holds nothing but the lock
    file at release is removed again. remove: delete the lock file at release (a lock next
    to an export, in a folder that is not himoe's)."""

    _held: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) of the lock file -> [fd, count]

    def __init__(self, directory: Path, lock_file: str = LOCK_FILE, create: bool = False,
                 remove: bool = False, flag: str = "--model_dir", shown: Path | None = None):
        self.directory, self.path = Path(directory), Path(directory) / lock_file
        self.create, self.remove = create, remove
        self.flag, self.shown = flag, shown or self.directory  # for the message
        self.key: tuple[int, int] | None = None
        self.created = False

    def acquire(self) -> None:
        if self.key is not None:
            return
        try:
            import fcntl
        except ImportError:  # Windows: unlocked, as `locked` is
            return
        if self.create and not self.directory.exists():
            self.directory.mkdir(parents=True)
            self.created = True
        while True:
            try:  # O_NOFOLLOW: a link planted under the lock's name is not followed
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | safe_path.O_NOFOLLOW
                             | safe_path.O_NONBLOCK | safe_path.O_CLOEXEC, 0o644)
            except OSError:
                safe_path.inside(self.directory, self.path.name)  # a link: say so
                raise
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # e.g. a FIFO planted under the lock's name
                os.close(fd)
                raise safe_path.UnsafeEntry(safe_path.special_problem(self.path, st.st_mode))
            key = (st.st_dev, st.st_ino)
            if key in self._held:  # this process holds it already
                os.close(fd)  # another descriptor: closing it keeps the flock
                self._held[key][1] += 1
                self.key = key
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.flag} {self.shown} is in use: {holder(st)} is "
                                "writing to it; wait for it to finish (or stop it), or pick "
                                f"another {self.flag}") from None
            except OSError:  # no flock on this file system: unlocked rather than not at all
                pass
            try:
                same = os.lstat(self.path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._held[key] = [fd, 1]
                self.key = key
                return
            os.close(fd)  # the holder removed it as we opened it: take the new one

    def release(self) -> None:
        if self.key is None:
            return
        key, self.key = self.key, None
        entry = self._held[key]
        entry[1] -= 1
        if entry[1]:
            return
        del self._held[key]
        try:  # removed while still locked; a process that opened it meanwhile sees that
            if self.remove or (self.created and os.listdir(self.directory) == [self.path.name]):
                self.path.unlink(missing_ok=True)
                if not self.remove:
                    with contextlib.suppress(OSError):
                        self.directory.rmdir()
        finally:
            os.close(entry[0])

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def holder(st: os.stat_result) -> str:
    """Who holds the flock on the file of `st`, from /proc/locks (Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()
            if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(st.st_ino):
                return f"himoe process pid {f[4]}"
    return "another himoe process"


def saved_step(directory: Path) -> int | None:
    """The step of the complete save in `directory`, from its manifest; None if none."""
    try:
        return mf.read(Path(directory) / mf.MANIFEST_FILE)["step"]
    except ValueError:
        return None


# --- recovery ---

def recover(directory: Path) -> str | None:
    """Finish or discard an interrupted save; call with the lock held. Returns one line
    saying what was done, or None when there was nothing to do."""
    directory = Path(directory)
    staging = directory / STAGING_DIR
    _remove_dead_temp_files(directory)
    try:
        mode = os.lstat(staging).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(mode):  # a file or a link in its place: unlinking never follows
        staging.unlink()
        return None
    try:
        staged = mf.read(staging / mf.MANIFEST_FILE)
    except ValueError:  # no (complete, sane) manifest: the save never reached its commit
        staged = None
    if staged is not None:
        _check_staged(directory, staged)
        _roll_forward(directory, staged)
        return (f"completed an interrupted save of step {staged['step']} in {directory} "
                "(its manifest had been written)")
    had_files = any(p.is_file() for p in staging.rglob("*"))
    shutil.rmtree(staging)
    if not had_files:  # only the empty shell of a save that had finished moving its files
        return None
    kept = saved_step(directory)
    kept_text = f"the complete save of step {kept} is kept" if kept is not None else \
        "there is no earlier complete save"
    return f"discarded an interrupted save in {directory}; {kept_text}"


def _remove_dead_temp_files(directory: Path) -> None:
    """`.name.tmp-PID` files of single-file atomic writes whose process has died. Only
    plain files: a folder of that shape (e.g. an export-hf killed half-way) is not ours."""
    for path in directory.glob(".*.tmp-*"):
        if is_dead_temp(path.name) and stat.S_ISREG(os.lstat(path).st_mode):
            path.unlink(missing_ok=True)


def is_dead_temp(name: str) -> bool:
    """`.NAME.tmp-PID` or `.NAME.old-PID` (atomic writes, export-hf) of a process that has
    died: a leftover, never something a user made."""
    if os.name == "nt" or not name.startswith("."):  # os.kill(pid, 0) would terminate it
        return False
    stem, _, pid = name.rpartition("-")
    return stem.endswith((".tmp", ".old")) and pid.isdigit() and not _alive(int(pid))


def _check_staged(directory: Path, staged: dict) -> None:
    """A staged save is completed only if every file it lists is a plain file, reached
    without a link, with its size and sha256: still in the staging directory, or already
    moved into place. A planted save that fails this is left alone, and so is D."""
    staging = directory / STAGING_DIR
    for rel, entry in staged["files"].items():
        try:
            here = safe_path.lstat(staging, rel)
            root = staging if here is not None else directory
            st = here or safe_path.lstat(directory, rel)
            if st is None:
                raise safe_path.UnsafeEntry(f"{rel} is neither staged nor in place")
            if here is not None and st.st_nlink > 1:  # a file the save wrote has one name
                raise safe_path.UnsafeEntry(f"{staging / rel} is a hard link")
            with safe_path.open_read(root, rel) as f:
                if st.st_size != entry["size"] or mf.sha256_of(f) != entry["sha256"]:
                    raise safe_path.UnsafeEntry(f"{root / rel} differs from its manifest")
        except safe_path.UnsafeEntry as e:
            raise UserError(f"{directory} holds an interrupted save that himoe will not "
                            f"complete: {e.reason}; delete {staging} to keep the save in "
                            f"{directory}, then run `himoe verify --model_dir {directory}`"
                            ) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _roll_forward(directory: Path, staged: dict) -> None:
    """Step 3 of a committed save. Every action is idempotent, so an interrupted roll
    forward is simply run again."""
    staging = directory / STAGING_DIR
    for rel in staged["files"]:
        if safe_path.lstat(staging, rel) is not None:
            src, dst = safe_path.inside(staging, rel), safe_path.inside(directory, rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            _pause()
    for parent in {(directory / rel).parent for rel in staged["files"]}:
        fsync_dir(parent)
    try:
        previous = mf.read(directory / mf.MANIFEST_FILE)
    except ValueError:
        previous = None
    if previous is not None:  # files of the old save that the new one does not have
        for rel in _stale(previous, staged["files"]):
            stale = safe_path.inside(directory, rel)
            stale.unlink(missing_ok=True)
            if stale.parent != directory:
                with contextlib.suppress(OSError):  # only if it is now empty
                    stale.parent.rmdir()
    os.replace(staging / mf.MANIFEST_FILE, directory / mf.MANIFEST_FILE)
    fsync_dir(directory)
    shutil.rmtree(staging, ignore_errors=True)


def _stale(previous: dict, files) -> list[str]:
    return [rel for rel in set(previous["files"]) - set(files) if rel.endswith(STALE_SUFFIXES)]


def check_targets(directory: Path, files) -> None:
    """Before any work of a save: every file it replaces, and every stale file it deletes,
    is a plain file inside `directory` (UnsafeEntry otherwise)."""
    try:
        previous = mf.read(directory / mf.MANIFEST_FILE)
    except ValueError:
        previous = None
    for rel in [*files, *(_stale(previous, files) if previous else ())]:
        safe_path.inside(directory, rel)


# --- saving ---

def save(directory: Path, files: dict[str, Writer], step: int) -> str | None:
    """Replace the saved set in `directory` with `files` ({relative path: writer}), all or
    nothing. Returns the note of a recovery done first, if any. Any exception before the
    commit leaves the previous complete save untouched and no staging directory behind."""
    directory = Path(directory)
    for rel in files:
        if not mf.is_safe_name(rel) or rel == mf.MANIFEST_FILE:
            raise ValueError(f"cannot save a file named {rel!r}")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return _save_locked(directory, files, step)
    except BaseException:
        if created:  # a first save that failed leaves no empty directory behind
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _save_locked(directory: Path, files: dict[str, Writer], step: int) -> str | None:
    with locked(directory):
        note = recover(directory)
        check_targets(directory, files)
        staging = directory / STAGING_DIR
        committed = False
        try:
            staging.mkdir()
            for rel, write in files.items():
                path = staging / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                _pause()
            for sub in {(staging / rel).parent for rel in files}:
                fsync_dir(sub)
            text = mf.to_text(mf.describe(staging, list(files), step))
            tmp = staging / f".{mf.MANIFEST_FILE}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, staging / mf.MANIFEST_FILE)  # the commit point
            fsync_dir(staging)
            committed = True
            _roll_forward(directory, mf.read(staging / mf.MANIFEST_FILE))
        except BaseException:
            if not committed:
                shutil.rmtree(staging, ignore_errors=True)
            raise
    return note
