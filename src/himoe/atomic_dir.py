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
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from himoe import manifest as mf

STAGING_DIR = ".himoe-save"
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


def _fsync_dir(path: Path) -> None:
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
    if not staging.exists() and not staging.is_symlink():
        return None
    if not staging.is_dir() or staging.is_symlink():
        staging.unlink()
        return None
    try:
        staged = mf.read(staging / mf.MANIFEST_FILE)
    except ValueError:  # no (complete, sane) manifest: the save never reached its commit
        staged = None
    if staged is not None:
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
    """`.name.tmp-PID` files of single-file atomic writes whose process has died."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return
    for path in directory.glob(".*.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


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
        src = staging / rel
        if src.is_file():
            dst = directory / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            _pause()
    for parent in {(directory / rel).parent for rel in staged["files"]}:
        _fsync_dir(parent)
    try:
        previous = mf.read(directory / mf.MANIFEST_FILE)
    except ValueError:
        previous = None
    if previous is not None:  # files of the old save that the new one does not have
        for rel in set(previous["files"]) - set(staged["files"]):
            if not rel.endswith(STALE_SUFFIXES):
                continue
            stale = directory / rel
            stale.unlink(missing_ok=True)
            if stale.parent != directory:
                with contextlib.suppress(OSError):  # only if it is now empty
                    stale.parent.rmdir()
    os.replace(staging / mf.MANIFEST_FILE, directory / mf.MANIFEST_FILE)
    _fsync_dir(directory)
    shutil.rmtree(staging, ignore_errors=True)


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
                _fsync_dir(sub)
            text = mf.to_text(mf.describe(staging, list(files), step))
            tmp = staging / f".{mf.MANIFEST_FILE}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, staging / mf.MANIFEST_FILE)  # the commit point
            _fsync_dir(staging)
            committed = True
            _roll_forward(directory, mf.read(staging / mf.MANIFEST_FILE))
        except BaseException:
            if not committed:
                shutil.rmtree(staging, ignore_errors=True)
            raise
    return note
