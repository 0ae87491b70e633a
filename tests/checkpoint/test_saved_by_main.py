"""A model directory written by himoe before the configs were split (main at 9ba6083, a
2-step run of `himoe train --n_embd 16 --n_head 2 --n_layer 1 --num_moes 2 --num_experts 2
--block_size 8 --batch_size 2 --max_iters 2 --eval_interval 2 --eval_iters 1 --seed 3`)
still loads, resumes, and is saved again with the same config.json keys, less the run's
own settings."""

import dataclasses
import json
import shutil
from pathlib import Path

from himoe.checkpoint import card as checkpoint
from himoe.config import HiMoEConfig, ModelConfig, RunConfig
from tests.cli.test_bad_input import himoe

SAVED = Path(__file__).resolve().parents[1] / "fixtures" / "main_9ba6083_model"


def test_old_config_json_loads_into_the_split_configs():
    cfg, vocab, step = checkpoint.read_config(SAVED)
    assert isinstance(cfg, HiMoEConfig) and step == 2 and len(vocab) == cfg.vocab_size
    assert (cfg.n_embd, cfg.num_moes, cfg.num_experts, cfg.seed) == (16, 2, 2, 3)
    assert type(cfg.model) is ModelConfig and cfg.model.n_embd == 16
    assert cfg.train.grad_clip == 1.0 and cfg.run.model_dir == "fx/tiny_model"
    model, _, _, _ = checkpoint.load_model(SAVED)
    assert type(model.cfg) is ModelConfig


def test_resume_continues_it_and_keeps_the_config_keys(tmp_path, capsys):
    work = tmp_path / "model"
    shutil.copytree(SAVED, work)
    before = json.loads((SAVED / "config.json").read_text())
    code, _, err = himoe(["train", "--resume", "--max_iters", "3", "--sample_tokens", "4",
                          "--model_dir", work], capsys)
    assert code == 0, err
    after = json.loads((work / "config.json").read_text())
    assert after["step"] == 3 and after["vocab"] == before["vocab"]
    # The run's own settings (device, paths, logging) are no longer recorded; every other
    # key is kept, and only the flag this resume changed has a new value. Settings added
    # since (e.g. expert_index_map, written by `experts prune`) appear at what a file
    # without them means (from_dict: no shared expert, a constant bias step).
    run = {f.name for f in dataclasses.fields(RunConfig)}
    assert list(after) == list(before)
    assert set(after["config"]) >= set(before["config"]) - run
    assert run <= set(before["config"]) and "data_file" in after["config"]
    defaults = dataclasses.asdict(HiMoEConfig.from_dict({}))
    for key in set(after["config"]) - set(before["config"]):
        assert after["config"][key] == defaults[key], key
    changed = {k for k in before["config"].keys() - run
               if after["config"][k] != before["config"][k]}
    assert changed == {"max_iters"}


def test_its_shared_expert_in_backbone_loads_and_moves_to_its_own_file(tmp_path, capsys):
    """Before the shared expert had a file of its own it lived in backbone.pt: such a
    directory loads with it, lists it, and a resumed save writes it to shared_expert.pt."""
    import torch

    work = tmp_path / "model"
    shutil.copytree(SAVED, work)
    old = torch.load(SAVED / "backbone.pt", weights_only=True)
    model, _, _, _ = checkpoint.load_model(work)
    assert torch.equal(model.blocks[0].shared_ffn.fc1.weight, old["blocks.0.shared_ffn.fc1.weight"])
    code, out, err = himoe(["experts", "list", "--model_dir", work, "--device", "cpu"], capsys)
    assert code == 0 and "shared_expert.pt" not in out, err  # not a file there yet
    code, _, err = himoe(["train", "--resume", "--max_iters", "3", "--sample_tokens", "4",
                          "--model_dir", work, "--train_only", "layer1.shared"], capsys)
    assert code == 0, err
    shared = torch.load(work / "shared_expert.pt", weights_only=True)
    assert set(shared) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert not torch.equal(shared["fc1.weight"], old["blocks.0.shared_ffn.fc1.weight"])
    code, out, err = himoe(["verify", "--model_dir", work], capsys)
    assert code == 0, err
