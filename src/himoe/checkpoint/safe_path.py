"""Paths inside a model directory, a staged save or an export, treated as untrusted.

A directory may come from anyone: a folder inside it can be a symbolic link to a folder
elsewhere, a file can be a FIFO, a manifest can name `../x`. Every read, write, move and
delete himoe does inside such a root goes through `inside(root, rel)`, which refuses an
absolute path, `..`, and any component under root that is a symbolic link (lstat, one
component at a time), so nothing outside root is ever read, replaced, moved or deleted.
Files are opened with O_NOFOLLOW as well, only regular files are read (a FIFO would block),
and new files are created with O_EXCL, never through an entry that is already there.

root itself is the user's choice and may be a link. A hard link needs no refusal: himoe
replaces files by renaming and deletes them by unlinking, so the file's other names keep
their bytes; `scan` (himoe verify) still reports one, since it may be shared with a file
outside. Not defended: another program swapping components while himoe works.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from himoe.errors import UserError

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnsafeEntry(UserError):
    """An entry himoe refuses to go through. `reason` is the problem alone (for callers that
    add their own fix); str() adds the fix."""

    def __init__(self, reason: str, fix: str = "replace it with a real file or folder, or "
                                              "move it out of the directory"):
        super().__init__(f"{reason}; {fix}")
        self.reason = reason


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def link_problem(path: Path) -> str:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return (f"{path} is a symbolic link{target}; himoe never follows links inside a model "
            "directory, which could lead outside it")


def special_problem(path: Path, mode: int) -> str:
    return f"{path} is a {_kind(mode)}, not a regular file"


def parts_of(rel: str) -> tuple[str, ...]:
    """The components of a relative path that stays under its root."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise UnsafeEntry(f"{rel!r} is not a plain relative path", "name a path inside the "
                          "directory")
    path = PurePosixPath(rel)
    if path.is_absolute() or any(p in ("", ".", "..") for p in rel.split("/")):
        raise UnsafeEntry(f"{rel!r} leads outside the directory (absolute, '.' or '..')",
                          "name a plain path inside the directory")
    return path.parts


def inside(root: Path, rel: str, kind: str = "file") -> Path:
    """root/rel, after checking that rel stays under root and that no existing component
    under root is a symbolic link. kind "file": an existing last component must be a regular
    file; "dir": a folder; "any": either. A missing component ends the check (what is not
    there cannot lead anywhere; the caller creates or reports it)."""
    parts = parts_of(rel)
    path = Path(root)
    for i, part in enumerate(parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return Path(root).joinpath(*parts)
        if stat.S_ISLNK(mode):
            raise UnsafeEntry(link_problem(path))
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(mode):
            return Path(root).joinpath(*parts)  # the open fails: "not a directory"
        if last and kind == "file" and not stat.S_ISREG(mode):
            raise UnsafeEntry(special_problem(path, mode), "replace it with the file himoe "
                              "saved")
        if last and kind == "dir" and not stat.S_ISDIR(mode):
            raise UnsafeEntry(f"{path} is a {_kind(mode)}, not a folder")
    return path


def open_read(root: Path, rel: str) -> BinaryIO:
    """root/rel opened for reading: a regular file reached without following any link.
    FileNotFoundError when it is not there."""
    path = inside(root, rel, "file")
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):  # swapped in since the check (ELOOP)
            raise UnsafeEntry(link_problem(path)) from None
        raise e from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeEntry(special_problem(path, mode), "replace it with the file himoe saved")
    return os.fdopen(fd, "rb")


def read_bytes(root: Path, rel: str) -> bytes:
    with open_read(root, rel) as f:
        return f.read()


def read_text(root: Path, rel: str) -> str:
    return read_bytes(root, rel).decode("utf-8")


def lstat(root: Path, rel: str, kind: str = "file") -> os.stat_result | None:
    """The lstat of root/rel after `inside`; None when it is not there."""
    try:
        return os.lstat(inside(root, rel, kind))
    except (FileNotFoundError, NotADirectoryError):
        return None


def create_new(path: Path) -> BinaryIO:
    """A new file at path, opened for writing. An entry already there (a leftover, or a link
    or hard link planted under that name) is removed first, never written through; O_EXCL
    and O_NOFOLLOW make the open fail rather than follow one planted in between."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """path replaced by what write(f) writes, through a temporary name and a rename: a crash
    leaves the old file or the new one, and a link at path is replaced, not followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with create_new(tmp) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def scan(root: Path, writing: bool = False) -> list[str]:
    """One line per entry anywhere under root that himoe would refuse: a symbolic link, a
    special file (FIFO, device, socket) and, unless `writing` (a writer's renames never
    change a hard link's other names), a hard-linked file. Links are listed, not entered."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                problems.append(link_problem(path))
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif not stat.S_ISREG(st.st_mode):
                problems.append(special_problem(path, st.st_mode))
            elif st.st_nlink > 1 and not writing:
                problems.append(f"{path} is a hard link ({st.st_nlink} names): the same file "
                                "may be reachable from outside the directory")
    return problems


def check_tree(root: Path) -> None:
    """Refuse root, before any work, while any entry under it is a link or a special file:
    a save or the end of training could write through it, a reader could leave root."""
    problems = scan(root, writing=True)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnsafeEntry(f"{problems[0]}{more}", "replace it with a real file or folder "
                          f"(`himoe verify --model_dir {root}` lists every such entry)")
