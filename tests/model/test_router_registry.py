"""A router type registered from outside the package trains, saves in the card's layout,
verifies, resumes exactly and loads back, with no other change to himoe; and no module but
the registry asks which router a model has."""

import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint.verify import verify
from himoe.model import losses
from himoe.model.routers.base import Routing
from himoe.model.routers.registry import (
    RouterSpec,
    register_router,
    router_names,
    unregister_router,
)
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import SMALL, TEXT, assert_one_line_error, himoe
from tests.conftest import tiny_config

SRC = Path(__file__).resolve().parents[2] / "src" / "himoe"


class ToyRouter(nn.Module):
    """Flat top-1 over all E experts from a learned linear gate, with a buffer that counts
    each expert's picks in training (state that a resume must carry)."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.n_embd, cfg.total_experts)
        self.register_buffer("picks_E", torch.zeros(cfg.total_experts))

    def forward(self, x_TD):
        z_TE = self.gate(x_TD.float())
        p_TE = F.softmax(z_TE, -1)
        weights_TK, ids_TK = p_TE.topk(1, dim=-1)
        if self.training:
            self.picks_E += torch.bincount(ids_TK.reshape(-1), minlength=self.cfg.total_experts)
        aux = {"switch": self.cfg.switch_coef * losses.switch_loss(p_TE, ids_TK)}
        return Routing(ids_TK, weights_TK, aux)


@pytest.fixture
def toy():
    """The toy router registered for one test, then removed again."""
    spec = register_router(RouterSpec("toy", "a test's flat top-1", ToyRouter,
                                      experts_per_token=lambda cfg: 1))
    yield spec
    unregister_router(spec.name)
    assert "toy" not in router_names()


def toy_config(model_dir: Path, **overrides):
    return tiny_config(router="toy", n_embd=16, num_moes=2, num_experts=3, batch_size=2,
                       max_iters=4, eval_interval=2, eval_iters=1, sample_tokens=8,
                       model_dir=str(model_dir), **overrides)


def test_a_registered_router_trains_saves_verifies_and_loads(toy, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    model_dir = tmp_path / "m"
    code, out, err = himoe(["train", "--router", "toy", *SMALL, "--num_experts", "3",
                            "--max_iters", "2", "--eval_interval", "2", "--data_file", corpus,
                            "--model_dir", model_dir], capsys)
    assert code == 0, err
    # The card's layout: one router file per layer holding the router's own state, one
    # file per expert, no group router files.
    for layer in ("layer_01_", "layer_02_"):
        router = torch.load(model_dir / f"{layer}main_router.pt", weights_only=True)
        assert set(router) == {"gate.weight", "gate.bias", "picks_E"}
        assert router["picks_E"].sum() > 0  # trained: the buffer counted picks
        for g in (1, 2):
            group = model_dir / f"{layer}moe_expert_{g:03d}"
            assert sorted(p.name for p in group.iterdir()) == [
                "model_001.pt", "model_002.pt", "model_003.pt"]
    problems, _ = verify(model_dir)
    assert not problems
    code, out, err = himoe(["verify", "--model_dir", model_dir], capsys)
    assert code == 0, err
    model, cfg, _, step = checkpoint.load_model(model_dir)
    assert (cfg.router, step) == ("toy", 2)
    # Saving the loaded model writes the same weights, file by file.
    files = checkpoint.to_files(model)
    for rel, sd in files.items():
        saved = checkpoint.load_weight_file(model_dir, rel)
        assert saved.keys() == sd.keys(), rel
        assert all(torch.equal(saved[k], sd[k]) for k in sd), rel
    # --train_only names the router's file like any other.
    code, _, err = himoe(["train", "--resume", "--max_iters", "3", "--model_dir", model_dir,
                          "--train_only", "layer1.router"], capsys)
    assert code == 0, err
    assert not verify(model_dir)[0]
    # What the toy cannot do is refused in one line.
    code, _, err = himoe(["experts", "add", "--model_dir", model_dir, "--layer", "1",
                          "--group", "1"], capsys)
    assert_one_line_error(code, err, "no per-group router")
    code, _, err = himoe(["export-hf", "--model_dir", model_dir, "--out", tmp_path / "hf"],
                         capsys)
    assert_one_line_error(code, err, "cannot rebuild")


def test_a_registered_router_resumes_exactly(toy, tmp_path):
    straight = Trainer(toy_config(tmp_path / "a"), out=io.StringIO()).train()
    first = Trainer(toy_config(tmp_path / "b"), out=io.StringIO()).train(stop_at=2)
    second = Trainer(toy_config(tmp_path / "b"), resume=True, out=io.StringIO()).train()
    assert first.train_losses + second.train_losses == straight.train_losses
    a, *_ = checkpoint.load_model(tmp_path / "a")
    b, *_ = checkpoint.load_model(tmp_path / "b")
    state_b = b.state_dict()
    assert any(key.endswith("router.picks_E") for key in state_b)
    for key, value in a.state_dict().items():
        assert torch.equal(value, state_b[key]), key


def test_router_flag_lists_the_registered_routers(toy, capsys):
    code, out, _ = himoe(["train", "--help"], capsys)
    assert code == 0 and "toy (a test's flat top-1)" in " ".join(out.split())
    code, _, err = himoe(["train", "--router", "nope", "--model_dir", "m"], capsys)
    assert_one_line_error(code, err, "'toy'")


def test_only_the_registry_asks_which_router_a_model_has():
    """A check such as cfg.router == "dense" belongs in the router's RouterSpec. The
    Hugging Face remote code is shipped standalone and keeps its own dispatch."""
    asks = re.compile(r"router\"?\]?\s*(==|!=)|router in \(")
    found = [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
             for path in sorted(SRC.rglob("*.py"))
             if path.relative_to(SRC).as_posix() not in ("model/routers/registry.py",
                                                          "hf/modeling_himoe.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if asks.search(line)]
    assert not found, "\n".join(found)
