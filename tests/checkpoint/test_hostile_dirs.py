"""Hostile model directories, staged saves and exports: links leading outside, special
files, a second writer, overwrites. Every case hashes the files outside the model directory
before and after: nothing outside it is ever read, moved, replaced or deleted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from himoe.checkpoint import atomic_dir, safe_path
from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import manifest as mf
from tests.cli import test_bad_input
from tests.cli.test_bad_input import SMALL, assert_one_line_error, himoe, tree

# The trained tiny model and a working copy of it, as in the bad-input matrix.
trained, work = test_bad_input.trained, test_bad_input.work

ROOT = Path(__file__).resolve().parents[2]
STAGING = atomic_dir.STAGING_DIR
GROUP = "layer_01_moe_expert_001"


def digests(root: Path) -> dict:
    """sha256 of every regular file under root (links are not followed), and every link."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = mf.sha256_file(path)
    return out


def outside_group(w: Path) -> Path:
    """GROUP moved out of the model directory and linked back in; the manifest still fits."""
    outside = w / "outside"
    outside.mkdir()
    shutil.move(w / "model" / GROUP, outside / GROUP)
    (w / "model" / GROUP).symlink_to(outside / GROUP)
    return outside


def resume(w, *flags):
    return ["train", "--resume", "--max_iters", "4", "--model_dir", w / "model", *flags]


# --- 1. links and special files: refused, reported, nothing outside touched ---

def linked_group(command):
    def setup(w):
        outside_group(w)
        if command == "train":
            return resume(w)
        return ["generate", "--model_dir", w / "model", "--max_new_tokens", "2"]
    return setup


def linked_file(rel, command="generate"):
    def setup(w):
        (w / "outside").mkdir()
        shutil.move(w / "model" / rel, w / "outside" / "file")
        (w / "model" / rel).symlink_to(w / "outside" / "file")
        if command == "train":
            return resume(w)
        return ["generate", "--model_dir", w / "model", "--max_new_tokens", "2"]
    return setup


def linked_extra(name):
    """A link the loader never opens (not in the manifest), which a save or the end of
    training would write through."""
    def setup(w):
        (w / "outside").mkdir()
        (w / "outside" / "victim").write_text("keep me")
        (w / "model" / name).unlink(missing_ok=True)
        (w / "model" / name).symlink_to(w / "outside" / "victim")
        return resume(w)
    return setup


def stale_through_link(w):
    """The manifest lists a .pt under a linked folder: a save would delete it as stale."""
    (w / "outside").mkdir()
    (w / "outside" / "model_009.pt").write_bytes(b"not yours")
    (w / "model" / "evil").symlink_to(w / "outside")
    meta = json.loads((w / "model" / "manifest.json").read_text())
    meta["files"]["evil/model_009.pt"] = {"size": 9, "sha256": mf.sha256_file(
        w / "outside" / "model_009.pt")}
    (w / "model" / "manifest.json").write_text(json.dumps(meta))
    return resume(w)


def fifo(rel, command="generate"):
    def setup(w):
        (w / "outside").mkdir()
        (w / "model" / rel).unlink()
        os.mkfifo(w / "model" / rel)
        if command == "verify":
            return ["verify", "--model_dir", w / "model"]
        return ["generate", "--model_dir", w / "model", "--max_new_tokens", "2"]
    return setup


def linked_from_dir(w):
    shutil.copytree(w / "model", w / "other")
    outside = w / "outside"
    outside.mkdir()
    shutil.move(w / "other" / GROUP, outside / GROUP)
    (w / "other" / GROUP).symlink_to(outside / GROUP)
    return ["experts", "swap", "--model_dir", w / "model", "--from_dir", w / "other",
            "--part", "layer1.group1.expert1"]


LINK_CASES = {
    "group folder linked outside (train --resume)": (linked_group("train"), "symbolic link"),
    "group folder linked outside (generate)": (linked_group("generate"), "symbolic link"),
    "config.json linked outside": (linked_file("config.json"), "symbolic link"),
    "expert file linked outside (train --resume)": (
        linked_file(f"{GROUP}/model_001.pt", "train"), "symbolic link"),
    "sample.txt linked outside (train --resume)": (linked_extra("sample.txt"), "symbolic link"),
    "tb linked outside (train --resume)": (linked_extra("tb"), "symbolic link"),
    "a stale file listed under a linked folder": (stale_through_link, "symbolic link"),
    "a weight file that is a FIFO": (fifo("backbone.pt"), "not a regular file"),
    "config.json that is a FIFO": (fifo("config.json"), "not a regular file"),
    "--from_dir with a linked group folder": (linked_from_dir, "symbolic link"),
}


@pytest.mark.parametrize("case", list(LINK_CASES))
def test_links_and_special_files_are_refused_and_nothing_outside_changes(case, work, capsys):
    setup, needle = LINK_CASES[case]
    argv = setup(work)
    outside, model = digests(work / "outside"), digests(work / "model")
    code, out, err = himoe(argv, capsys)
    assert_one_line_error(code, err, needle)
    assert digests(work / "outside") == outside
    assert digests(work / "model") == model


def test_verify_reports_links_special_files_and_hard_links(work, capsys):
    model = work / "model"
    outside = outside_group(work)
    os.mkfifo(model / "notes")
    os.link(model / "backbone.pt", work / "backbone_copy.pt")
    before = digests(outside)
    code, out, err = himoe(["verify", "--model_dir", model], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert any(GROUP in line and "symbolic link" in line for line in lines), err
    assert any("notes" in line and "not a regular file" in line for line in lines), err
    assert any("backbone.pt" in line and "hard link" in line for line in lines), err
    assert digests(outside) == before


@pytest.mark.slow  # seconds of whole training runs
def test_a_hard_linked_file_is_never_written_through(work, capsys):
    """A save replaces files by renaming, so the other name of a hard link keeps its bytes."""
    rel = f"{GROUP}/model_001.pt"
    os.link(work / "model" / rel, work / "twin.pt")
    before = mf.sha256_file(work / "twin.pt")
    code, _, err = himoe(resume(work), capsys)
    assert code == 0, err
    assert mf.sha256_file(work / "twin.pt") == before
    assert os.stat(work / "model" / rel).st_nlink == 1


# --- 1. a planted interrupted save ---

def plant_staged_save(w: Path, entry: str) -> Path:
    """A committed-looking .himoe-save/ whose manifest fits a file kept outside and reached
    through a link: a folder link ("folder"), a file link ("file") or a hard link ("hard")."""
    model, outside = w / "model", w / "outside"
    outside.mkdir()
    staging = model / STAGING
    staging.mkdir()
    rel = f"{GROUP}/router.pt"
    shutil.copy(model / rel, outside / "router.pt")
    if entry == "folder":
        (staging / GROUP).symlink_to(outside)
    else:
        (staging / GROUP).mkdir()
        if entry == "file":
            (staging / rel).symlink_to(outside / "router.pt")
        else:
            os.link(outside / "router.pt", staging / rel)
    # Only the router: a roll forward would delete every other .pt of the model as stale.
    manifest = {"himoe_manifest": 1, "step": 9, "files": {rel: {
        "size": (outside / "router.pt").stat().st_size,
        "sha256": mf.sha256_file(outside / "router.pt")}}}
    (staging / "manifest.json").write_text(json.dumps(manifest))
    return outside


@pytest.mark.parametrize("entry", ["folder", "file", "hard"])
@pytest.mark.parametrize("command", ["generate", "verify"])
def test_a_planted_staged_save_is_not_completed(command, entry, work, capsys):
    outside = plant_staged_save(work, entry)
    before_outside = digests(outside)
    before_model = {k: v for k, v in digests(work / "model").items()
                    if not k.startswith(STAGING)}
    argv = ["generate", "--max_new_tokens", "2"] if command == "generate" else ["verify"]
    code, out, err = himoe([*argv, "--model_dir", work / "model"], capsys)
    assert_one_line_error(code, err, "will not complete")
    assert STAGING in err
    assert digests(outside) == before_outside
    after_model = {k: v for k, v in digests(work / "model").items()
                   if not k.startswith(STAGING)}
    assert after_model == before_model


def test_a_staged_manifest_that_is_a_link_is_never_read(work, capsys):
    (work / "outside").mkdir()
    (work / "outside" / "m.json").write_text(json.dumps(
        {"himoe_manifest": 1, "step": 9, "files": {"backbone.pt": {"size": 1, "sha256": "0"}}}))
    (work / "model" / STAGING).mkdir()
    (work / "model" / STAGING / "manifest.json").symlink_to(work / "outside" / "m.json")
    before = digests(work / "outside")
    code, _, err = himoe(["generate", "--model_dir", work / "model", "--max_new_tokens", "2"],
                         capsys)
    assert code == 0, err  # discarded as a save that never reached its commit
    assert not (work / "model" / STAGING).exists()
    assert digests(work / "outside") == before


def test_a_staging_folder_that_is_a_link_is_removed_not_entered(work, capsys):
    outside = work / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    (outside / "backbone.pt").write_bytes(b"not yours")
    (work / "model" / STAGING).symlink_to(outside)
    before = digests(outside)
    code, _, err = himoe(["verify", "--model_dir", work / "model"], capsys)
    assert code == 0, err
    assert not os.path.lexists(work / "model" / STAGING)
    assert digests(outside) == before


def test_safe_path_refuses_dotdot_absolute_and_links(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    for rel in ("../x", "/etc/passwd", "a/../../x", "", "a//b", "./a"):
        with pytest.raises(safe_path.UnsafeEntry):
            safe_path.inside(tmp_path, rel)
    with pytest.raises(safe_path.UnsafeEntry, match="symbolic link"):
        safe_path.inside(tmp_path, "link/f")
    assert safe_path.inside(tmp_path, "d/f") == tmp_path / "d" / "f"
    assert safe_path.read_bytes(tmp_path, "d/f") == b"x"


def test_an_atomic_write_never_follows_a_planted_temporary_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / f".out.txt.tmp-{os.getpid()}").symlink_to(victim)
    checkpoint.atomic_write_text("new", tmp_path / "out.txt")
    assert victim.read_text() == "keep me"
    assert (tmp_path / "out.txt").read_text() == "new"


def test_export_refuses_a_linked_model_and_a_linked_out(work, tmp_path, capsys):
    outside = outside_group(work)
    before = digests(outside)
    code, _, err = himoe(["export-hf", "--model_dir", work / "model", "--out", work / "hf"],
                         capsys)
    assert_one_line_error(code, err, "symbolic link")
    assert digests(outside) == before and not (work / "hf").exists()
    (work / "real_hf").mkdir()
    (work / "real_hf" / "mine.txt").write_text("mine")
    (work / "hf").symlink_to(work / "real_hf")
    code, _, err = himoe(["export-hf", "--model_dir", work / "model", "--out", work / "hf",
                          "--force"], capsys)
    assert_one_line_error(code, err, "symbolic link")
    assert (work / "real_hf" / "mine.txt").read_text() == "mine"


# --- 2. one writer at a time ---

HOLD = ("import sys, time; from pathlib import Path; "
        "from himoe.checkpoint.atomic_dir import WriterLock; "
        "WriterLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(120)")


def hold_lock(model_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(model_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow  # seconds of whole training runs
def test_a_second_writer_is_refused_and_a_killed_holder_never_blocks(work, capsys):
    model = work / "model"
    holder = hold_lock(model)
    try:
        before = tree(work)
        code, _, err = himoe(resume(work), capsys)
        assert_one_line_error(code, err, f"pid {holder.pid}")
        code, _, err = himoe(["experts", "add", "--model_dir", model, "--layer", "1",
                              "--group", "1"], capsys)
        assert_one_line_error(code, err, f"pid {holder.pid}")
        assert tree(work) == before
        # readers are not writers: they work while the lock is held
        assert himoe(["verify", "--model_dir", model], capsys)[0] == 0
        assert himoe(["generate", "--model_dir", model, "--max_new_tokens", "2"], capsys)[0] == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    code, _, err = himoe(resume(work), capsys)  # the dead holder's lock is gone with it
    assert code == 0, err
    assert checkpoint.read_config(model)[2] == 4


@pytest.mark.slow
def test_two_real_trainers_on_one_directory(work):
    """`himoe train --resume` twice at once: the second exits 2 naming the first's pid."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    first = subprocess.Popen(
        [sys.executable, "-m", "himoe", "train", "--resume", "--max_iters", "6",
         "--eval_interval", "2", "--model_dir", str(work / "model")], cwd=ROOT,
        env=env | {atomic_dir.SLOW_SAVE_ENV: "0.2"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (work / "model" / STAGING).exists():  # inside its first save: surely locked
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.01)
    second = subprocess.run(
        [sys.executable, "-m", "himoe", "train", "--resume", "--max_iters", "8",
         "--model_dir", str(work / "model")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120)
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert_one_line_error(second.returncode, second.stderr, f"pid {first.pid}")
    assert checkpoint.read_config(work / "model")[2] == 6


# --- 3. no silent overwrites ---

def user_folder(w):
    (w / "mine").mkdir()
    (w / "mine" / "config.json").write_text('{"my": "settings"}')
    return w / "mine"


OVERWRITE_CASES = {
    "a trained model without --resume": (
        lambda w: ["--model_dir", w / "model"], "--resume"),
    "a trained model without --resume names --force": (
        lambda w: ["--model_dir", w / "model"], "--force"),
    "a folder with the user's config.json": (
        lambda w: ["--model_dir", user_folder(w)], "not a himoe model directory"),
    "a folder with the user's config.json, even with --force": (
        lambda w: ["--model_dir", user_folder(w), "--force"], "not a himoe model directory"),
    "an empty --model_dir": (lambda w: ["--model_dir", ""], "--model_dir is empty"),
    "the current directory holding other files": (
        lambda w: ["--model_dir", "."], "not a himoe model directory"),
}


@pytest.mark.parametrize("case", list(OVERWRITE_CASES))
def test_train_never_overwrites_silently(case, work, capsys):
    setup, needle = OVERWRITE_CASES[case]
    argv = ["train", *SMALL, "--max_iters", "2", "--data_file", work / "corpus.txt",
            *setup(work)]
    before = digests(work)
    code, _, err = himoe(argv, capsys)
    assert_one_line_error(code, err, needle)
    assert digests(work) == before


def test_force_replaces_a_trained_model(work, capsys):
    argv = ["train", *SMALL, "--max_iters", "3", "--eval_interval", "3", "--data_file",
            work / "corpus.txt", "--model_dir", work / "model", "--force"]
    code, _, err = himoe(argv, capsys)
    assert code == 0, err
    assert checkpoint.read_config(work / "model")[2] == 3
    assert himoe(["verify", "--model_dir", work / "model"], capsys)[0] == 0


def test_an_empty_folder_and_a_killed_runs_lock_are_fine_for_a_new_model(work, capsys):
    (work / "empty").mkdir()
    (work / "empty" / atomic_dir.LOCK_FILE).write_text("")  # as a SIGKILL before any save
    code, _, err = himoe(["train", *SMALL, "--max_iters", "2", "--data_file",
                          work / "corpus.txt", "--model_dir", work / "empty"], capsys)
    assert code == 0, err


# --- 6. leftovers of a killed export-hf ---

@pytest.mark.slow  # seconds of whole training runs
def test_a_dead_exports_leftover_folder_does_not_break_a_save(work, capsys):
    leftover = work / "model" / ".hf.tmp-999999"  # a pid that is not running
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    code, _, err = himoe(resume(work), capsys)
    assert code == 0, err
    (work / "runs").mkdir()
    shutil.copytree(leftover, work / "runs" / ".hf.tmp-999999")
    code, _, err = himoe(["train", *SMALL, "--max_iters", "2", "--data_file",
                          work / "corpus.txt", "--model_dir", work / "runs"], capsys)
    assert code == 0, err


@pytest.mark.slow  # seconds of whole training runs
def test_the_model_dir_itself_may_be_a_link(work, capsys):
    """Only entries inside are refused: the folder the user names is the user's choice."""
    (work / "alias").symlink_to(work / "model")
    code, _, err = himoe(["train", "--resume", "--max_iters", "4", "--model_dir",
                          work / "alias"], capsys)
    assert code == 0, err
    assert himoe(["verify", "--model_dir", work / "alias"], capsys)[0] == 0
