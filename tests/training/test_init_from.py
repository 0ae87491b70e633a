"""`himoe train --init_from DIR`: a new run from a saved model's weights and tokenizer."""

import io
import json

import pytest
import torch

from himoe.checkpoint import card as checkpoint
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.conftest import tiny_config

SEED_TEXT = "to be, or not to be, that is the question.\n" * 20
BRANCH_TEXT = "the question is not to be, or be it so.\n" * 20  # the same characters


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    (root / "seed.txt").write_text(SEED_TEXT)
    (root / "branch.txt").write_text(BRANCH_TEXT)
    cfg = tiny_config(n_embd=16, block_size=16, num_moes=2, num_experts=2, batch_size=2,
                      max_iters=6, eval_interval=3, eval_iters=1, sample_tokens=8,
                      data_file=str(root / "seed.txt"), model_dir=str(root / "seed"))
    Trainer(cfg, out=io.StringIO()).train()
    return root


def test_a_branch_starts_at_step_0_from_the_saved_weights(seed_dir, tmp_path):
    seed, cfg_seed, vocab, step = checkpoint.load_model(seed_dir / "seed")
    assert step == 6
    cfg = tiny_config(n_embd=16, block_size=16, num_moes=2, num_experts=2, batch_size=2,
                      max_iters=4, eval_interval=2, eval_iters=1, sample_tokens=8,
                      lr=5e-3, data_file=str(seed_dir / "branch.txt"),
                      model_dir=str(tmp_path / "branch"))
    trainer = Trainer(cfg, out=io.StringIO(), init_from=seed_dir / "seed")
    assert trainer.step == 0 and trainer.tokenizer.vocab == vocab
    for key, value in seed.state_dict().items():  # before any step: the seed's weights
        assert torch.equal(value, trainer.model.state_dict()[key]), key
    # A fresh optimiser: no moments yet, at the branch's own warm-up rate.
    assert not trainer.optimizer.state
    result = trainer.train()
    assert result.step == 4
    branch, cfg_branch, _, _ = checkpoint.load_model(tmp_path / "branch")
    assert cfg_branch.lr == 5e-3 and cfg_branch.data_file == str(seed_dir / "branch.txt")
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # the branch's own log, not the seed's
    moved = [k for k, v in seed.state_dict().items() if not torch.equal(v, branch.state_dict()[k])]
    assert moved  # it trained


def test_the_cli_keeps_the_saved_shape_and_routing(seed_dir, tmp_path, capsys):
    code, out, err = himoe(["train", "--init_from", seed_dir / "seed", "--data_file",
                            seed_dir / "branch.txt", "--model_dir", tmp_path / "b",
                            "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
                            "--sample_tokens", "4", "--batch_size", "2", "--device", "cpu",
                            "--switch_coef", "0.02"], capsys)
    assert code == 0, err
    saved, _, _ = checkpoint.read_config(seed_dir / "seed")
    _, cfg, _, step = checkpoint.load_model(tmp_path / "b")
    assert step == 2 and cfg.n_embd == saved.n_embd == 16 and cfg.num_moes == 2
    assert cfg.switch_coef == 0.02  # a routing loss may change, as on --resume


@pytest.mark.parametrize("extra, needle", [
    (["--n_embd", "32"], "--n_embd 32 differs from"),
    (["--resume"], "--init_from starts a new run"),
    (["--preset", "dense"], "drop --preset"),
])
def test_bad_branch_flags_are_one_line(seed_dir, tmp_path, capsys, extra, needle):
    code, _, err = himoe(["train", "--init_from", seed_dir / "seed", "--data_file",
                          seed_dir / "branch.txt", "--model_dir", tmp_path / "b", *extra], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "b").exists()


def test_a_source_that_is_no_model_or_the_same_folder_is_refused(seed_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = himoe(["train", "--init_from", tmp_path / "empty", "--data_file",
                          seed_dir / "branch.txt", "--model_dir", tmp_path / "b"], capsys)
    assert_one_line_error(code, err, str(tmp_path / "empty"))
    code, _, err = himoe(["train", "--init_from", seed_dir / "seed", "--data_file",
                          seed_dir / "branch.txt", "--model_dir", seed_dir / "seed", "--force"],
                         capsys)
    assert_one_line_error(code, err, "the new run needs a folder of its own")
    assert checkpoint.read_config(seed_dir / "seed")[2] == 6  # untouched


def test_characters_the_source_lacks_are_named(seed_dir, tmp_path, capsys):
    (tmp_path / "other.txt").write_text("XYZ! " * 100)
    code, _, err = himoe(["train", "--init_from", seed_dir / "seed", "--data_file",
                          tmp_path / "other.txt", "--model_dir", tmp_path / "b"], capsys)
    assert_one_line_error(code, err, "does not know")
    assert not (tmp_path / "b").exists()
