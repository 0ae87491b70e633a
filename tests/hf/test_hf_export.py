"""`himoe export-hf`: the export loads in transformers and computes what himoe computes."""

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint.quantize import quantize_expert
from himoe.data.tokenizers import CharTokenizer
from himoe.hf.export import export_hf
from himoe.model import HiMoEModel
from tests.cli.test_bad_input import assert_one_line_error, himoe
from tests.conftest import tiny_config

TEXT = "To be, or not to be: that is the question.\nHam. 'Tis é; quick! Why?"
VOCAB = sorted(set(TEXT))


def randomised(cfg, seed=0) -> HiMoEModel:
    """A model whose weights and balancing biases are far from their initial values, so
    that routing differs from token to token and every router's choices matter."""
    torch.manual_seed(seed)
    model = HiMoEModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("expert_scale_E"):
                p.uniform_(0.5, 1.5)
            elif "ln" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            elif name == "pos_emb.weight":  # greedy decoding then moves on, not round a loop
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if cfg.bias_update_rate and name.endswith(("bias_N", "bias_E")):
                # Loss-free balancing's selection-only biases; all below 0, so that an
                # empty slot of a smaller group (bias 0, never exported) would win if not
                # masked. A uniform shift changes no other choice.
                b.normal_(0, 0.1).sub_(0.5)
    return model.eval()


def save(model, model_dir: Path) -> Path:
    checkpoint.save_model(model, VOCAB, 5, model_dir)
    return model_dir


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def load_hf(transformers, out: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, local_files_only=True)
    return model.eval()


ROUTERS = [
    dict(router="hierarchical", top_k_groups=2, top_k_experts=2, bias_update_rate=1e-3),
    dict(router="hierarchical", capacity_factor=1.0),
    dict(router="hierarchical", shared_fraction=0.25, switch_coef=0.01),
    dict(router="grouped", top_k_experts=2, router_temp=0.7),
    dict(router="topk", top_k_experts=3, renormalize=True, bias_update_rate=1e-3),
    dict(router="topk", top_k_experts=2),
    dict(router="group_limited", top_k_groups=2, top_k_experts=3, bias_update_rate=1e-3),
    dict(router="dense"),
]


@pytest.mark.parametrize("overrides", ROUTERS, ids=lambda o: "-".join(map(str, o.values())))
def test_logits_equal_himoe_for_every_router(overrides, transformers, tmp_path):
    assert_export_logits_equal(tiny_config(vocab_size=len(VOCAB), **overrides), 0,
                               transformers, tmp_path)


def assert_export_logits_equal(cfg, seed, transformers, tmp_path):
    ours = randomised(cfg, seed)
    export_hf(save(ours, tmp_path / "m"), tmp_path / "hf")
    hf = load_hf(transformers, tmp_path / "hf")
    gen = torch.Generator().manual_seed(1)
    idx_BT = torch.randint(len(VOCAB), (3, cfg.block_size), generator=gen)
    with torch.no_grad():
        want_BTV, _ = ours(idx_BT)
        got_BTV = hf(idx_BT).logits
    assert want_BTV.std() > 1  # a model with something to get wrong
    assert (got_BTV - want_BTV).abs().max() < 1e-4


@pytest.mark.parametrize("router", ["hierarchical", "grouped"])
def test_generate_with_cache_equals_without_and_himoe(router, transformers, tmp_path):
    cfg = tiny_config(vocab_size=len(VOCAB), router=router, block_size=32, top_k_experts=2)
    ours = randomised(cfg, seed=3)
    export_hf(save(ours, tmp_path / "m"), tmp_path / "hf")
    hf = load_hf(transformers, tmp_path / "hf")
    prompt_1T = torch.tensor([CharTokenizer(VOCAB).encode("To be, or")])
    new = cfg.block_size - prompt_1T.shape[1]  # up to the last learned position
    cached = hf.generate(prompt_1T, max_new_tokens=new, do_sample=False, use_cache=True)
    uncached = hf.generate(prompt_1T, max_new_tokens=new, do_sample=False, use_cache=False)
    himoe_greedy = ours.generate(prompt_1T, new, temperature=0)
    assert cached.shape == (1, cfg.block_size)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, himoe_greedy)
    assert len(set(cached[0, prompt_1T.shape[1]:].tolist())) > 3  # not one token repeated


def test_left_padded_batch_gives_each_row_its_own_logits(transformers, tmp_path):
    cfg = tiny_config(vocab_size=len(VOCAB), top_k_experts=2)
    ours = randomised(cfg, seed=4)
    export_hf(save(ours, tmp_path / "m"), tmp_path / "hf")
    hf = load_hf(transformers, tmp_path / "hf")
    long_T = torch.randint(len(VOCAB), (12,), generator=torch.Generator().manual_seed(2))
    short_T = long_T[:7].flip(0)
    ids_BT = torch.stack([long_T, torch.cat([torch.zeros(5, dtype=torch.long), short_T])])
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[1, :5] = 0
    position_BT = (mask_BT.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        got_BTV = hf(ids_BT, attention_mask=mask_BT, position_ids=position_BT).logits
        for row, tokens_T in enumerate((long_T, short_T)):
            want_TV, _ = ours(tokens_T[None])
            assert (got_BTV[row, -len(tokens_T):] - want_TV[0]).abs().max() < 1e-4


def test_char_tokenizer_encodes_and_decodes_like_himoe(transformers, tmp_path):
    export_hf(save(randomised(tiny_config(vocab_size=len(VOCAB))), tmp_path / "m"),
              tmp_path / "hf")
    # The plain call of the brief, without trust_remote_code: the tokenizer needs no code.
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = CharTokenizer(VOCAB)
    for text in (TEXT, "  a  b\n\n", "é", "?:;,.'!"):
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text)
        assert tok.decode(ids) == text == ours.decode(ids)


def test_bpe_model_dir_exports_its_tokenizer_json(transformers, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT * 20, "the quick brown fox\n" * 10],
                            trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    size = bpe.get_vocab_size()
    vocab = [bpe.id_to_token(i) for i in range(size)]
    model = randomised(tiny_config(vocab_size=size))
    checkpoint.save_model(model, vocab, 1, tmp_path / "m")
    bpe.save(str(tmp_path / "m" / "tokenizer.json"))
    export_hf(tmp_path / "m", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                     trust_remote_code=True)
    for text in (TEXT, "the quick fox, or not"):
        ids = tok(text)["input_ids"]
        assert ids == bpe.encode(text).ids
        assert len(ids) < len(text)  # merges, not bytes
        assert tok.decode(ids) == bpe.decode(ids) == text


def test_quantised_experts_are_dequantised(transformers, tmp_path):
    cfg = tiny_config(vocab_size=len(VOCAB))
    model_dir = save(randomised(cfg), tmp_path / "m")
    for path in model_dir.glob("*/model_*.pt"):
        torch.save(quantize_expert(torch.load(path, weights_only=True)), path)
    ours, _, _, _ = checkpoint.load_model(model_dir)  # dequantised on load
    export_hf(model_dir, tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    hf = load_hf(transformers, tmp_path / "hf")
    idx_BT = torch.randint(len(VOCAB), (2, cfg.block_size))
    with torch.no_grad():
        assert (hf(idx_BT).logits - ours.eval()(idx_BT)[0]).abs().max() < 1e-4


def test_export_files_without_transformers(tmp_path):
    cfg = tiny_config(vocab_size=len(VOCAB), router="grouped")
    model = randomised(cfg)
    summary = export_hf(save(model, tmp_path / "m"), tmp_path / "hf")
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "configuration_himoe.py", "generation_config.json", "model.safetensors",
        "modeling_himoe.py", "tokenizer.json", "tokenizer_config.json"])
    meta = json.loads((out / "config.json").read_text())
    assert meta["auto_map"]["AutoModelForCausalLM"] == "modeling_himoe.HimoeForCausalLM"
    assert meta["model_type"] == "himoe" and meta["router"] == "grouped"
    # Every tensor bit for bit, but the tied head and the grouped router's training-only EMA.
    weights = load_file(out / "model.safetensors")
    state = model.state_dict()
    assert set(weights) == set(state) - {"lm_head.weight", "blocks.0.ffn.router.logit_ema_E",
                                         "blocks.1.ffn.router.logit_ema_E"}
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert summary["params"] == sum(w.numel() for w in weights.values())
    # The remote code stands alone: it never imports himoe.
    for name in ("modeling_himoe.py", "configuration_himoe.py"):
        imported = {n.module or "" for n in ast.walk(ast.parse((out / name).read_text()))
                    if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(ast.parse((out / name).read_text()))
            if isinstance(n, ast.Import) for a in n.names}
        assert imported and not any(m.split(".")[0] == "himoe" for m in imported)
    assert not list(tmp_path.glob(".hf.*"))  # no temporary directory left behind


def test_cli_refuses_foreign_dirs_and_replaces_exports(tmp_path, capsys):
    model_dir = save(randomised(tiny_config(vocab_size=len(VOCAB))), tmp_path / "m")
    out = tmp_path / "hf"
    code, stdout, err = himoe(["export-hf", "--model_dir", model_dir, "--out", out], capsys)
    assert code == 0, err
    assert "exported" in stdout and (out / "model.safetensors").is_file()
    first = (out / "model.safetensors").read_bytes()
    code, _, err = himoe(["export-hf", "--model_dir", model_dir, "--out", out], capsys)
    assert code == 0, err  # a previous export is replaced without --force
    assert (out / "model.safetensors").read_bytes() == first

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    code, _, err = himoe(["export-hf", "--model_dir", model_dir, "--out", foreign], capsys)
    assert_one_line_error(code, err, "--force")
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]
    code, _, err = himoe(["export-hf", "--model_dir", model_dir, "--out", foreign, "--force"],
                         capsys)
    assert code == 0, err
    assert not (foreign / "todo.txt").exists() and (foreign / "modeling_himoe.py").is_file()

    code, _, err = himoe(["export-hf", "--model_dir", tmp_path / "nope", "--out",
                          tmp_path / "x"], capsys)
    assert_one_line_error(code, err, "does not exist")
    code, _, err = himoe(["export-hf", "--model_dir", model_dir, "--out",
                          model_dir / "config.json"], capsys)
    assert_one_line_error(code, err, "is a file")
    code, _, err = himoe(["export-hf", "--model_dir", model_dir, "--out", tmp_path, "--force"],
                         capsys)
    assert_one_line_error(code, err, "would replace the model directory")
    assert (model_dir / "config.json").is_file()
    assert not (tmp_path / "x").exists()


def test_bad_tokenizer_files_stop_with_one_line(tmp_path, capsys):
    model_dir = save(randomised(tiny_config(vocab_size=len(VOCAB))), tmp_path / "m")
    (model_dir / "tokenizer.json").write_text("{not json")
    argv = ["export-hf", "--model_dir", model_dir, "--out", tmp_path / "hf"]
    code, _, err = himoe(argv, capsys)
    assert_one_line_error(code, err, "not a valid tokenizers file")
    (model_dir / "tokenizer.json").unlink()
    meta = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(meta | {"tokenizer": "bpe"}))
    code, _, err = himoe(argv, capsys)
    assert_one_line_error(code, err, "tokenizer.json is missing")
    assert not (tmp_path / "hf").exists()


def test_ragged_groups_export_with_their_empty_slots_masked(transformers, tmp_path):
    # After `himoe experts add` groups differ in size; the export must never route to the
    # empty slots of the smaller groups.
    sizes = [[2, 3, 3], [3, 2, 3]]  # tiny_config: 2 layers of 3 groups
    cfg = tiny_config(vocab_size=len(VOCAB), num_experts=3, top_k_experts=2,
                      group_experts=sizes, bias_update_rate=1e-3)
    assert_export_logits_equal(cfg, 5, transformers, tmp_path)
