"""--log tensorboard scalars, and the PNG plots written at the end of training."""

import io
import sys

import pytest

from himoe.analysis import training_plots
from himoe.errors import UserError
from himoe.training.trainer import Trainer
from tests.cli.test_bad_input import himoe
from tests.edit.test_experts import small_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_config(tmp_path / "m", max_iters=6, eval_interval=3, log="tensorboard")
    result = Trainer(cfg, out=io.StringIO()).train()
    acc = EventAccumulator(str(tmp_path / "m" / "tb"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 7))
    assert [e.value for e in loss] == pytest.approx(result.train_losses, rel=1e-6)
    val = acc.Scalars("val/loss")
    assert [e.step for e in val] == [3, 6]
    assert [e.value for e in val] == pytest.approx([ev["val_loss"] for ev in result.evals])
    assert len(acc.Scalars("train/lr")) == 6 and len(acc.Scalars("speed/tokens_per_s")) == 2
    for layer in (1, 2):
        cv = acc.Scalars(f"layer_{layer:02d}/expert_cv")
        assert cv[-1].value == pytest.approx(result.evals[-1]["layers"][layer - 1]["expert_cv"])
    assert "layer_02/dead_experts" in scalars


def test_log_dir_flag_in_both_spellings(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    for flag, name in (("--log_dir", "a"), ("--log-dir", "b")):
        code, _, err = himoe(["train", "--model_dir", tmp_path / f"m{name}", "--log",
                              "tensorboard", flag, tmp_path / f"tb_{name}", "--n_embd", "16",
                              "--n_head", "2", "--block_size", "16", "--num_moes", "2",
                              "--num_experts", "2", "--batch_size", "2", "--max_iters", "2",
                              "--eval_iters", "1", "--sample_tokens", "4", "--device", "cpu"],
                             capsys)
        assert code == 0, err
        assert list((tmp_path / f"tb_{name}").glob("events.out.tfevents.*"))
        assert not (tmp_path / f"m{name}" / "tb").exists()


def test_missing_tensorboard_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(UserError, match=r"pip install 'himoe\[tensorboard\]'"):
        Trainer(small_config(tmp_path / "m", log="tensorboard"), out=io.StringIO())
    assert not (tmp_path / "m").exists()


def test_plots_are_written_at_the_end(tmp_path):
    out = io.StringIO()
    Trainer(small_config(tmp_path / "m"), out=out).train()
    for name in (training_plots.LOSS_PNG, training_plots.LOAD_PNG):
        assert (tmp_path / "m" / name).read_bytes().startswith(PNG_MAGIC)
    assert "plots written to" in out.getvalue()
    Trainer(small_config(tmp_path / "d", router="dense"), out=io.StringIO()).train()
    assert (tmp_path / "d" / training_plots.LOSS_PNG).is_file()
    assert not (tmp_path / "d" / training_plots.LOAD_PNG).exists()  # no routing to plot


def test_no_matplotlib_skips_plots_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(training_plots, "pyplot", lambda: None)
    out = io.StringIO()
    result = Trainer(small_config(tmp_path / "m"), out=out).train()
    assert result.step == 2 and (tmp_path / "m" / "sample.txt").is_file()
    assert "no PNG plots were written" in out.getvalue()
    assert not list((tmp_path / "m").glob("*.png"))
