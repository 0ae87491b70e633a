"""KV-cache generation against full recomputation."""

import pytest
import torch

from himoe.model import HiMoEModel
from himoe.model.attention import KVCache
from himoe.model.transformer import sample_next
from tests.conftest import tiny_config


def test_cached_logits_equal_full_forward():
    torch.manual_seed(0)
    model = HiMoEModel(tiny_config()).eval()
    idx = torch.randint(0, 20, (2, 16))
    full, _ = model(idx)
    cfg = model.cfg
    cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head,
                    "cpu", torch.float32)
    pieces = [model(idx[:, :5], cache=cache)[0]]  # prefill, then mixed chunk sizes
    pieces.append(model(idx[:, 5:9], cache=cache)[0])
    for t in range(9, 16):
        pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None),
                                                     (0.8, 5, None), (1.0, None, 0.9)])
def test_cached_and_uncached_generation_give_the_same_tokens(temperature, top_k, top_p):
    torch.manual_seed(1)
    model = HiMoEModel(tiny_config()).eval()
    prompt = torch.randint(0, 20, (2, 3))
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        # 50 tokens with block_size 16: the context window restarts several times.
        runs.append(model.generate(prompt, 50, temperature=temperature, top_k=top_k,
                                   top_p=top_p, use_cache=use_cache, generator=gen))
    assert runs[0].shape == (2, 53)
    assert torch.equal(runs[0], runs[1])


def test_long_prompt_is_cut_to_the_window():
    model = HiMoEModel(tiny_config()).eval()
    prompt = torch.randint(0, 20, (1, 40))
    out = model.generate(prompt, 5, temperature=0.0)
    assert torch.equal(out[:, :40], prompt) and out.shape == (1, 45)


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    picked = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(picked.flatten().tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.66, 0.24, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    picked = sample_next(logits, 1.0, top_p=0.8, generator=gen)
    assert set(picked.flatten().tolist()) == {0, 1}
    assert sample_next(logits[:1], 0.0).item() == 0


@pytest.mark.parametrize("temperature, top_p", [(1e-320, None), (1e-40, 0.9), (1.0, 1e-320),
                                                (0.5, 5e-324)])
def test_extreme_temperature_and_top_p_pick_the_top_token(temperature, top_p):
    # logits / 1e-320 overflow to inf (softmax gives NaN); a top_p below float rounding
    # used to drop even the first token.
    logits_BV = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    gen = torch.Generator().manual_seed(0)
    picks = sample_next(logits_BV, temperature, top_p=top_p, generator=gen)
    assert picks.flatten().tolist() == [1, 0]
