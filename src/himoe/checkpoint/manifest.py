"""manifest.json: the commit record of a save.

It lists every file of one save (relative path, size, sha256) and the step. A save writes it
last, so a manifest names a complete set of files; `himoe verify` checks the files against it.
Paths in a manifest are read from disk, so they are treated as hostile: only plain relative
paths inside the model directory are accepted, never `..`, absolute or hidden names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from himoe.checkpoint import safe_path

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


def sha256_of(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_of(f)


def is_safe_name(rel: str) -> bool:
    """A relative path that stays inside the model directory and is not a hidden name."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    path = PurePosixPath(rel)
    return not path.is_absolute() and all(
        part not in ("", ".", "..") and not part.startswith(".") for part in path.parts)


def describe(root: Path, names: list[str], step: int) -> dict:
    """The manifest of files `names` under `root`, hashed as they are on disk now."""
    files = {}
    for rel in names:
        path = root / rel
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return {"himoe_manifest": MANIFEST_FORMAT, "step": step, "files": files}


def to_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1) + "\n"


def read(path: Path) -> dict:
    """The manifest at `path`. ValueError (with the reason) when it is unreadable, malformed
    or names a path outside the directory."""
    path = Path(path)
    try:  # never through a link, never a FIFO
        data = json.loads(safe_path.read_text(path.parent, path.name))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, safe_path.UnsafeEntry) as e:
        raise ValueError(f"cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("himoe_manifest") != MANIFEST_FORMAT:
        raise ValueError("it is not a himoe manifest of format 1")
    step, files = data.get("step"), data.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"its step {step!r} is not a non-negative integer")
    if not isinstance(files, dict) or not files:
        raise ValueError("it lists no files")
    for rel, entry in files.items():
        if not is_safe_name(rel):
            raise ValueError(f"it names {rel!r}, which is not a plain path inside the directory")
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("sha256"), str)):
            raise ValueError(f"its entry for {rel} has no integer size and sha256 string")
    return data


def check(root: Path, manifest: dict) -> list[tuple[str, str]]:
    """(kind, one line) per listed file that is "missing", differs in "size" or "content"
    (sha256), or is "unsafe" to open (a link on its path, a special file)."""
    problems = []
    for rel, entry in manifest["files"].items():
        path = Path(root) / rel
        try:
            st = safe_path.lstat(root, rel)
            if st is None:
                problems.append(("missing", f"{path} is listed in {MANIFEST_FILE} but missing"))
            elif st.st_size != entry["size"]:
                problems.append(("size", f"{path} has {st.st_size} bytes, "
                                         f"{MANIFEST_FILE} says {entry['size']}"))
            else:
                with safe_path.open_read(root, rel) as f:
                    if sha256_of(f) != entry["sha256"]:
                        problems.append(("content", f"{path} differs from the file that was "
                                                    "saved (sha256 mismatch)"))
        except safe_path.UnsafeEntry as e:
            problems.append(("unsafe", str(e)))
    return problems
