"""`himoe chat`: piped input, /reset, empty lines, end of input, Ctrl-C, --show_routing."""

import io
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from himoe.analysis.routing_log import routing_trace
from himoe.checkpoint import card as checkpoint
from himoe.cli.chat import ChatSession
from himoe.data.tokenizers import CharTokenizer
from himoe.training.trainer import Trainer
from tests.edit.test_experts import small_config

ROOT = Path(__file__).resolve().parents[2]
TAG = re.compile(r"(.)\[(\d\.\d(?:[+|]\d\.\d)*)\]\n?", re.S)  # g.j+g.j|g.j+g.j: layers, then k


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    Trainer(small_config(root / "m"), out=io.StringIO()).train()
    return root / "m"


def session(model_dir, out, colour=False, **flags):
    """A chat as `himoe chat --temperature 0 --max_new_tokens 8` runs it, writing to out."""
    model, _, vocab, _ = checkpoint.load_model(model_dir)
    model.eval()
    args = Namespace(**{"model_dir": model_dir, "show_routing": False, "max_new_tokens": 8,
                        "temperature": 0.0, "top_k": None, "top_p": None, "seed": 1} | flags)
    return ChatSession(model, CharTokenizer(vocab), args, out=out, err=io.StringIO(),
                       colour=colour)


@pytest.mark.slow
def test_piped_chat_streams_replies_resets_and_exits_at_end_of_input(model_dir):
    lines = "Ham.\n\n   \n/reset\nKing.\n"  # no /quit: end of input ends the chat
    r = subprocess.run([sys.executable, "-m", "himoe", "chat", "--model_dir", str(model_dir),
                        "--max_new_tokens", "8", "--temperature", "0", "--device", "cpu"],
                       input=lines, capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "conversation cleared" in r.stderr
    # Two replies (the empty lines were ignored); after /reset, "King." gets the same reply
    # as in a fresh session, so the first exchange is gone from the context.
    fresh = io.StringIO()
    session(model_dir, fresh).reply("King.")
    assert r.stdout.endswith(fresh.getvalue())
    first = io.StringIO()
    session(model_dir, first).reply("Ham.")
    assert r.stdout == first.getvalue() + fresh.getvalue()


def test_show_routing_prints_each_tokens_experts_per_layer(model_dir):
    out = io.StringIO()
    chat = session(model_dir, out, show_routing=True)
    new = chat.reply("Ham.")
    shown = TAG.findall(out.getvalue())
    assert len(shown) == len(new) == 8
    # Each tag is the routing of that token as the model reads it, after what came before.
    trace = routing_trace(chat.model, chat.tok.encode("Ham.\n") + new)[-len(new):]
    expect = ["|".join("+".join(f"{c['group']}.{c['expert']}" for c in token
                                if c["layer"] == layer) for layer in (1, 2)) for token in trace]
    assert all(tag.count("+") == 2 for tag in expect)  # the default's two experts, two layers
    assert [tag for _, tag in shown] == expect
    coloured = io.StringIO()
    session(model_dir, coloured, show_routing=True, colour=True).reply("Ham.")
    assert "\x1b[3" in coloured.getvalue() or "\x1b[9" in coloured.getvalue()


def test_ctrl_c_and_quit_end_the_chat_cleanly(model_dir):
    class Interrupting(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    assert session(model_dir, io.StringIO()).run(Interrupting()) == 0
    out = io.StringIO()
    assert session(model_dir, out).run(io.StringIO("/quit\nHam.\n")) == 0
    assert out.getvalue() == ""  # nothing after /quit was read
