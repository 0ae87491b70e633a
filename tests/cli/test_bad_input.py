"""Bad and hostile input: one line naming the problem and the fix, exit code 2, no
traceback, nothing written. Most cases call himoe.cli.main in-process (fast); one runs the
real command to check the process as a whole."""

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from himoe.checkpoint import card as checkpoint
from himoe.cli import main
from himoe.data import corpus_files
from himoe.training.trainer import Trainer
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
TEXT = "the quick brown fox jumps over the lazy dog; then it sleeps.\n" * 12  # 732 chars
SMALL = ["--n_embd", "16", "--n_head", "2", "--n_layer", "2", "--block_size", "16",
         "--num_moes", "2", "--num_experts", "2", "--batch_size", "2", "--eval_iters", "1",
         "--sample_tokens", "8", "--device", "cpu"]



def himoe(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `himoe ARGV`, run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside the parser
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def tree(root: Path) -> dict:
    """Every file and directory under root (hidden ones too), with size and mtime."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny trained model directory (2 steps) and its corpus; tests work on copies."""
    root = tmp_path_factory.mktemp("trained")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    cfg = tiny_config(n_embd=16, n_layer=2, block_size=16, num_moes=2, num_experts=2,
                      batch_size=2, max_iters=2, eval_interval=2, eval_iters=1, sample_tokens=8,
                      data_file=str(root / "corpus.txt"), model_dir=str(root / "model"))
    Trainer(cfg, out=io.StringIO()).train()
    return root


@pytest.fixture
def work(trained, tmp_path, monkeypatch) -> Path:
    """tmp_path as the working directory, holding corpus.txt and a copy of the model."""
    shutil.copy(trained / "corpus.txt", tmp_path / "corpus.txt")
    shutil.copytree(trained / "model", tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- each case: setup(work dir, monkeypatch) -> argv, and the text the error must hold ---

def write(name, data):
    def setup(w, mp):
        path = w / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return ["train", *SMALL, "--data_file", path, "--model_dir", w / "new"]
    return setup


def write_dir(files: dict):
    """A corpus directory holding `files` ({name: text})."""
    def setup(w, mp):
        (w / "docs").mkdir()
        for name, text in files.items():
            (w / "docs" / name).write_text(text)
        return ["train", *SMALL, "--data_file", w / "docs", "--model_dir", w / "new"]
    return setup


def train_flags(*flags):
    return lambda w, mp: ["train", *SMALL, "--data_file", w / "corpus.txt",
                          "--model_dir", w / "new", *flags]


def generate_flags(*flags):
    return lambda w, mp: ["generate", "--model_dir", w / "model", "--max_new_tokens", "4",
                          *flags]


def broken_model(change, command="generate"):
    def setup(w, mp):
        change(w / "model")
        if command == "generate":
            return ["generate", "--model_dir", w / "model", "--max_new_tokens", "4"]
        return ["train", "--resume", "--max_iters", "4", "--model_dir", w / "model"]
    return setup


def remove(rel):
    return lambda m: (m / rel).unlink()


def replace_pt(rel, obj):
    return lambda m: torch.save(obj, m / rel)


def edit_config(edit):
    def change(m):
        meta = json.loads((m / "config.json").read_text())
        edit(meta)
        (m / "config.json").write_text(json.dumps(meta))
    return change


def set_config(command="generate", **values):
    """config.json with these values in its "config"; the manifest still matches."""
    return broken_model(edit_config(lambda meta: meta["config"].update(values)), command)


def truncate(rel):
    def change(m):
        data = (m / rel).read_bytes()
        (m / rel).write_bytes(data[: len(data) // 2])
    return change


def not_writable(w, mp):
    mp.setattr(os, "access", lambda *a, **k: False)  # tests run as root: pretend
    return ["train", *SMALL, "--data_file", w / "corpus.txt", "--model_dir", w / "new"]


def under_a_file(w, mp):
    (w / "plain").write_text("x")
    return ["train", *SMALL, "--data_file", w / "corpus.txt", "--model_dir", w / "plain/run"]


def model_dir_is_file(command):
    def setup(w, mp):
        (w / "file").write_text("x")
        if command == "generate":
            return ["generate", "--model_dir", w / "file"]
        return ["train", *SMALL, "--data_file", w / "corpus.txt", "--model_dir", w / "file"]
    return setup


def resume_on_new_characters(w, mp):
    (w / "upper.txt").write_text(TEXT.upper())
    return ["train", "--resume", "--max_iters", "4", "--model_dir", w / "model",
            "--data_file", w / "upper.txt"]


def poison(rel, value):
    """Every floating tensor of weight file `rel` gets one `value` (NaN, inf)."""
    def change(m):
        sd = torch.load(m / rel, weights_only=True)
        for t in sd.values():
            if t.is_floating_point():
                t.view(-1)[0] = value
        torch.save(sd, m / rel)
    return change


def special_file(kind):
    """--data_file naming something that is not a regular file: reading it would hang
    (a FIFO with no writer), never end (/dev/zero) or fail (a socket)."""
    def setup(w, mp):
        if kind == "fifo":
            os.mkfifo(w / "fifo.txt")
            path = w / "fifo.txt"
        elif kind == "socket":
            with socket.socket(socket.AF_UNIX) as s:
                s.bind("sock.txt")  # relative: a socket path has a length limit
            path = w / "sock.txt"
        elif kind == "fifo in a directory":
            (w / "docs").mkdir()
            (w / "docs" / "a.txt").write_text(TEXT)
            os.mkfifo(w / "docs" / "b.txt")
            path = w / "docs"
        elif kind == "fifo in a glob":
            os.mkfifo(w / "pipe.txt")
            path = w / "*.txt"
        else:
            path = Path(kind)
        return ["train", *SMALL, "--data_file", path, "--model_dir", w / "new"]
    return setup


def corpus_over_the_limit(w, mp):
    mp.setattr(corpus_files, "MAX_CORPUS_BYTES", 500)
    return train_flags()(w, mp)


EXPERT = "layer_01_moe_expert_002/model_001.pt"
CASES = {
    # corpus
    "corpus missing": (train_flags("--data_file", "/nonexistent/c.txt"), "does not exist"),
    "corpus directory holds a binary file": (
        lambda w, mp: train_flags("--data_file", w)(w, mp), "looks binary"),
    "corpus directory without files": (write_dir({".hidden.txt": TEXT}), "without text files"),
    "corpus glob matches nothing": (lambda w, mp: train_flags("--data_file", w / "*.nope")(w, mp),
                                    "matches no files"),
    "corpus of documents too short to split": (
        write_dir({"a.txt": TEXT, "b.txt": "tiny\n"}), "needs at least"),
    "--vocab_size without --tokenizer bpe": (train_flags("--vocab_size", "500"),
                                             "add --tokenizer bpe"),
    "BPE vocabulary below the byte alphabet": (train_flags("--tokenizer", "bpe", "--vocab_size",
                                                           "100"), "at least 257"),
    "corpus empty": (write("empty.txt", ""), "is empty"),
    "corpus only blanks": (write("blank.txt", " \n\n\t"), "is empty"),
    "corpus binary": (write("bin.txt", b"ab\x00\x01\x02" * 200), "looks binary"),
    "corpus not UTF-8": (write("latin1.txt", "caf\u00e9 ".encode("latin-1") * 300),
                         "not valid UTF-8"),
    "corpus shorter than block_size+1": (write("short.txt", "abcdef"), "too short"),
    "validation split too short": (write("short_val.txt", "abcdefghij" * 10), "too short"),
    # special files and sizes as the corpus
    "corpus is a FIFO": (special_file("fifo"), "is not a regular file"),
    "corpus is /dev/zero": (special_file("/dev/zero"), "is not a regular file"),
    "corpus is a socket": (special_file("socket"), "is not a regular file"),
    "corpus directory holds a FIFO": (special_file("fifo in a directory"),
                                      "is not a regular file"),
    "corpus glob matches a FIFO": (special_file("fifo in a glob"), "is not a regular file"),
    "corpus above the size limit": (corpus_over_the_limit, "larger than the 500-byte limit"),
    # config.json values of the wrong type or absurd size, manifest left consistent
    "config.json float for an int": (set_config(n_embd=16.0),
                                     "config.json: n_embd must be an integer, got 16.0"),
    "config.json bool for an int": (set_config(num_moes=True),
                                    "config.json: num_moes must be an integer, got true"),
    "config.json bool for a float": (set_config(dropout=False),
                                     "config.json: dropout must be a number, got false"),
    "config.json string for a bool": (set_config(renormalize="yes"),
        "renormalize must be true or false"),
    "config.json null for an int": (set_config(n_layer=None),
                                    "n_layer must be an integer, got null"),
    "config.json list for a string": (set_config(router=["topk"]), "router must be a string"),
    "config.json of format 1, unknown router": (  # checked before format 1 is read
        broken_model(edit_config(lambda meta: meta.update(himoe_format=1) or meta["config"]
                                 .update(router="nope", expert_hidden=0)), "generate"),
        "config.json: router 'nope' is not one of"),
    "config.json num_experts 10^9": (set_config(num_experts=10**9),
                                      "num_experts 1000000000 is above the limit of 4,096"),
    "config.json n_embd 10^9 (resume)": (set_config(n_embd=10**9, command="train"),
                                         "config.json: n_embd 1000000000 is above"),
    "config.json block_size 10^12": (set_config(block_size=10**12),
                                      "block_size 1000000000000 is above"),
    "config.json vocab_size 10^10": (set_config(vocab_size=10**10),
                                      "vocab_size 10000000000 is above"),
    "config.json negative seed": (set_config(seed=-1, command="train"),
                                   "config.json: seed must be >= 0, got -1"),
    "config.json step not an integer": (broken_model(edit_config(
        lambda meta: meta.update(step=1.5))), "step must be an integer >= 0, got 1.5"),
    "config.json vocab a string": (broken_model(edit_config(
        lambda meta: meta.update(vocab="abc"))), "vocabulary must be a list"),
    # weights that are not finite
    "NaN in the backbone": (broken_model(poison("backbone.pt", float("nan"))), "not finite"),
    "inf in an expert": (broken_model(poison(EXPERT, float("inf"))), "not finite"),
    "NaN in a router (resume)": (broken_model(poison("layer_01_main_router.pt", float("nan")),
                                              "train"), "not finite"),
    # model directory, read by generate and by train --resume
    "model file missing": (broken_model(remove(EXPERT)), "is missing"),
    "model file missing (resume)": (broken_model(remove(EXPERT), "train"), "is missing"),
    "train_state.pt missing": (broken_model(remove("train_state.pt"), "train"),
                               "cannot resume exactly"),
    "backbone of the wrong shape": (broken_model(replace_pt("backbone.pt", {
        "tok_emb.weight": torch.zeros(3, 5)})), "has shape"),
    "expert of the wrong shape": (broken_model(replace_pt(EXPERT, {
        "fc1.weight": torch.zeros(8, 16), "fc1.bias": torch.zeros(8),
        "fc2.weight": torch.zeros(16, 8), "fc2.bias": torch.zeros(16)})), "different shapes"),
    "router of the wrong shape": (broken_model(replace_pt(
        "layer_01_moe_expert_001/router.pt", {"weight": torch.zeros(5, 16)})),
        "has 5 rows but its group has 2"),
    "weight file that is a bare tensor": (broken_model(replace_pt(EXPERT, torch.zeros(3))),
                                          "state_dict of tensors"),
    "truncated weight file": (broken_model(truncate("backbone.pt")), "cannot load"),
    "config.json not JSON": (broken_model(lambda m: (m / "config.json").write_text("{oops")),
                             "is broken"),
    "config.json wrong type": (set_config(n_embd="wide"),
                               'n_embd must be an integer, got "wide"'),
    "config.json impossible value": (set_config(n_head=3), "not divisible"),
    "config.json vocab mismatch": (broken_model(edit_config(
        lambda meta: meta["vocab"].pop())), "does not match"),
    "config.json missing": (broken_model(remove("config.json")), "config.json is missing"),
    "config.json broken (resume)": (broken_model(
        lambda m: (m / "config.json").write_text("[]"), "train"), "is broken"),
    "model_dir is a file (generate)": (model_dir_is_file("generate"), "is a file"),
    "model_dir does not exist": (generate_flags("--model_dir", "/nonexistent/m"),
                                 "does not exist"),
    # prompt
    "prompt outside the vocabulary": (generate_flags("--prompt", "HAMLET: caf\u00e9"),
                                      "':', 'A', 'E', 'H', 'L', 'M', 'T', '\u00e9'"),
    # impossible training flags
    "n_embd zero": (train_flags("--n_embd", "0"), "positive"),
    "n_layer negative": (train_flags("--n_layer", "-1"), "positive"),
    "block_size zero": (train_flags("--block_size", "0"), "positive"),
    "batch_size negative": (train_flags("--batch_size", "-4"), "positive"),
    "max_iters zero": (train_flags("--max_iters", "0"), "positive"),
    "eval_interval zero": (train_flags("--eval_interval", "0"), "positive"),
    "num_experts zero": (train_flags("--num_experts", "0"), "positive"),
    "n_embd not divisible by n_head": (train_flags("--n_embd", "30", "--n_head", "4"),
                                       "not divisible"),
    "top_k_experts above num_experts": (train_flags("--top_k_experts", "3"), "larger than"),
    "top_k_groups above num_moes": (train_flags("--top_k_groups", "3"), "larger than"),
    "lr not a number": (train_flags("--lr", "fast"), "--lr needs a float"),
    "lr nan": (train_flags("--lr", "nan"), "finite"),
    "lr negative": (train_flags("--lr", "-0.001"), "non-negative"),
    "lr zero": (train_flags("--lr", "0"), "greater than 0"),
    "dropout negative": (train_flags("--dropout", "-0.1"), "non-negative"),
    "dropout one": (train_flags("--dropout", "1"), "below 1"),
    "size not an integer": (train_flags("--n_embd", "3.5"), "--n_embd needs a int"),
    "bool not a bool": (train_flags("--compile", "maybe"), "true or false"),
    "unknown router": (train_flags("--router", "magic"), "invalid choice"),
    "unknown flag": (train_flags("--no_such_flag", "4"), "unrecognized"),
    "seed negative": (train_flags("--seed", "-1"), "--seed must be >= 0, got -1"),
    "seed above 2^64": (train_flags("--seed", str(2**64)), "--seed 18446744073709551616 is above"),
    "sample_tokens negative": (train_flags("--sample_tokens", "-1"), "--sample_tokens"),
    "num_experts 10^9": (train_flags("--num_experts", str(10**9)), "--num_experts"),
    "n_embd 10^6": (train_flags("--n_embd", str(10**6), "--n_head", "2"), "above the limit"),
    "sizes too large together": (train_flags("--n_embd", "65536", "--num_experts", "64"),
                                 "GB of memory"),
    "batch_size 10^9": (train_flags("--batch_size", str(10**9)), "--batch_size"),
    "batch too large for memory": (train_flags("--batch_size", str(2**20), "--block_size", "1024"),
                                   "needs at least"),
    "block_size 10^9": (train_flags("--block_size", str(10**9)), "--block_size"),
    "vocab_size 10^9": (train_flags("--tokenizer", "bpe", "--vocab_size", str(10**9)),
                        "--vocab_size"),
    "max_iters 10^30": (train_flags("--max_iters", str(10**30)), "--max_iters"),
    "capacity_factor 1e308": (train_flags("--capacity_factor", "1e308"), "--capacity_factor"),
    "ema_beta above 1": (train_flags("--ema_beta", "5"), "--ema_beta 5.0 is above the limit"),
    "resume changes the model shape": (lambda w, mp: ["train", "--resume", "--n_embd", "32",
                                                      "--model_dir", w / "model"], "differs"),
    "resume past max_iters": (lambda w, mp: ["train", "--resume", "--max_iters", "2",
                                             "--model_dir", w / "model"], "already at step"),
    "resume on a corpus with new characters": (resume_on_new_characters, "does not know"),
    # impossible generation flags
    "max_new_tokens negative": (generate_flags("--max_new_tokens", "-1"), "between 0 and"),
    "num_samples zero": (generate_flags("--num_samples", "0"), ">= 1"),
    "temperature negative": (generate_flags("--temperature", "-1"), "--temperature"),
    "temperature nan": (generate_flags("--temperature", "nan"), "--temperature"),
    "num_samples 10^8": (generate_flags("--num_samples", str(10**8)), "--num_samples"),
    "max_new_tokens 10^12": (generate_flags("--max_new_tokens", str(10**12)),
                             "--max_new_tokens"),
    "generate seed negative": (generate_flags("--seed", "-1"), "--seed must be"),
    "generate seed above 2^64": (generate_flags("--seed", str(2**64 + 1)), "--seed must be"),
    "top_k zero": (generate_flags("--top_k", "0"), "--top_k must be >= 1"),
    "top_p zero": (generate_flags("--top_p", "0"), "--top_p must be in (0, 1]"),
    "top_p above one": (generate_flags("--top_p", "1.5"), "--top_p must be in (0, 1]"),
    # where the model goes
    "model_dir is a file (train)": (model_dir_is_file("train"), "is a file"),
    "model_dir under a file": (under_a_file, "cannot be created"),
    "model_dir not writable": (not_writable, "not writable"),
}


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, work, capsys, monkeypatch):
    setup, needle = CASES[case]
    argv = setup(work, monkeypatch)
    before = tree(work)
    with time_limit(120):  # reading a FIFO used to hang
        code, out, err = himoe(argv, capsys)
    assert_one_line_error(code, err, needle)
    assert tree(work) == before  # no directory created, no file touched


def test_unknown_prompt_characters_can_be_skipped(work, capsys):
    code, out, err = himoe(["generate", "--model_dir", work / "model", "--prompt", "Hi the",
                            "--max_new_tokens", "5", "--unknown", "skip"], capsys)
    assert code == 0, err
    assert err.strip() == "himoe: dropped prompt characters outside the vocabulary: 'H'"
    assert out.startswith("i the") and len(out.rstrip("\n")) == 5 + 5


# --- no code from files ---

class RunsCode:
    """Unpickling this calls exec(), which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def plant(path: Path, marker: Path, raw: bool) -> None:
    payload = {"weight": RunsCode(marker)}
    if raw:  # a bare pickle stream
        path.write_bytes(pickle.dumps(payload))
    else:  # the zip container torch.save writes
        torch.save(payload, path)


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("target", ["backbone.pt", "train_state.pt"])
@pytest.mark.parametrize("raw", [False, True], ids=["torch.save", "pickle"])
@pytest.mark.parametrize("command", ["generate", "train --resume", "verify"])
def test_a_pickle_that_runs_code_is_refused(command, raw, target, work, capsys):
    marker = work / "marker"
    plant(work / "model" / target, marker, raw)
    if command == "generate":
        argv = ["generate", "--model_dir", work / "model", "--max_new_tokens", "2"]
    elif command == "verify":
        argv = ["verify", "--model_dir", work / "model"]
    else:
        argv = ["train", "--resume", "--max_iters", "4", "--model_dir", work / "model"]
    code, out, err = himoe(argv, capsys)
    assert not marker.exists()
    if command == "generate" and target == "train_state.pt":
        assert code == 0  # generate never opens train_state.pt
        return
    lines = [line for line in err.strip().splitlines() if "refused to load" in line]
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and target in lines[0] and "could run code" in lines[0], err
    if command != "verify":
        assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_pickle_that_runs_code_is_refused_by_the_real_command(work):
    marker = work / "marker"
    plant(work / "model" / "backbone.pt", marker, raw=False)
    r = subprocess.run([sys.executable, "-m", "himoe", "generate", "--model_dir",
                        str(work / "model")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "refused to load" in r.stderr
    assert not marker.exists()


# --- a full disk during a save ---

def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(work, capsys, monkeypatch):
    model_dir = work / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if (model_dir / "manifest.json").exists():  # the first save went through
            f.write(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, out, err = himoe(["train", *SMALL, "--max_iters", "4", "--eval_interval", "2",
                            "--data_file", work / "corpus.txt", "--model_dir", model_dir],
                           capsys)
    errors = [line for line in err.splitlines() if line.startswith("himoe:")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and "No space left on device" in errors[0], err
    assert "step 2 is kept" in errors[0]
    monkeypatch.setattr(torch, "save", real_save)
    assert himoe(["verify", "--model_dir", model_dir], capsys)[0] == 0
    assert checkpoint.read_config(model_dir)[2] == 2
    assert not (model_dir / ".himoe-save").exists()


def test_a_full_disk_at_the_first_save_leaves_nothing(work, capsys, monkeypatch):
    def save(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    code, out, err = himoe(["train", *SMALL, "--max_iters", "2", "--eval_interval", "2",
                            "--data_file", work / "corpus.txt", "--model_dir", work / "run"],
                           capsys)
    errors = [line for line in err.splitlines() if line.startswith("himoe:")]
    assert code == 2 and len(errors) == 1 and "no earlier save exists" in errors[0], err
    assert not (work / "run").exists()


def test_a_negative_value_is_read_as_a_value(tmp_path, capsys):
    # argparse alone takes "-1e-3" for a flag and says only "expected one argument".
    code, _, err = himoe(["train", "--model_dir", tmp_path / "m", "--lr", "-1e-3"], capsys)
    assert_one_line_error(code, err, "--lr must be a finite non-negative number, got -0.001")
    assert not (tmp_path / "m").exists()


# --- what verify sees must be what a load would trip on ---

@pytest.mark.parametrize("change, needle", [
    (poison("backbone.pt", float("nan")), "not finite"),
    (edit_config(lambda meta: meta["config"].update(num_experts=10**9)), "num_experts 1000000000"),
    (edit_config(lambda meta: meta["config"].update(n_head=2.0)), "n_head must be an integer"),
], ids=["NaN weights", "num_experts 10^9", "float n_head"])
def test_verify_reports_what_would_stop_a_load(change, needle, work, capsys):
    change(work / "model")
    code, out, err = himoe(["verify", "--model_dir", work / "model"], capsys)
    assert code == 2 and "Traceback" not in err and "OK" not in out
    assert any(needle in line for line in err.splitlines()), err


def test_the_largest_seed_trains_and_generates(work, capsys):
    top = str(2**63 - 1)
    code, _, err = himoe(["train", *SMALL, "--max_iters", "1", "--eval_interval", "1",
                          "--seed", top, "--data_file", work / "corpus.txt",
                          "--model_dir", work / "run"], capsys)
    assert code == 0, err
    code, out, err = himoe(["generate", "--model_dir", work / "run", "--max_new_tokens", "3",
                            "--seed", top], capsys)
    assert code == 0 and out.strip(), err


# --- a full disk during export-hf ---

@pytest.mark.parametrize("earlier", [True, False], ids=["earlier export", "first export"])
@pytest.mark.parametrize("where", ["weights", "json"])
def test_a_full_disk_during_export_keeps_the_earlier_export(where, earlier, work, capsys,
                                                            monkeypatch):
    pytest.importorskip("safetensors")
    import safetensors.torch

    out = work / "hf"
    if earlier:
        code, _, err = himoe(["export-hf", "--model_dir", work / "model", "--out", out], capsys)
        assert code == 0, err
    before = tree(work)
    real_write_text = Path.write_text

    def full(path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if where == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file",
                            lambda tensors, path, metadata=None: full(path))
    else:
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: full(self)
                            if self.name == "generation_config.json"
                            else real_write_text(self, *a, **k))
    code, _, err = himoe(["export-hf", "--model_dir", work / "model", "--out", out], capsys)
    assert_one_line_error(code, err, "No space left on device")
    assert (f"{out} is unchanged" if earlier else f"nothing was written to {out}") in err
    assert tree(work) == before  # nothing half-written beside it either
