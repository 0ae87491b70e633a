"""The GPU path, checked in minutes the first time a GPU is at hand (scripts/gpu_check.sh).

Marked `cuda` and skipped where no CUDA device is visible, so CI (CPU only) never needs one.
"""

import os

import pytest
import torch

from himoe.checkpoint import card as checkpoint
from himoe.model import HiMoEModel
from himoe.model.attention import KVCache
from himoe.model.experts import ExpertBank, grouped_mm_supported
from himoe.training.trainer import Trainer
from tests.conftest import tiny_config
from tests.model.test_dispatch import naive_experts

# cuBLAS gives the same bits run after run only with a fixed workspace; it reads this when
# it first starts, which no test here has done yet at import time.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_grouped_mm_dispatch_matches_the_per_token_reference(dtype, tol):
    """The bank's GPU path (grouped_mm forward and its own backward, under autocast for
    bf16) against one token and one expert at a time in fp32 on the same weights."""
    assert grouped_mm_supported("cuda", dtype), "grouped_mm must run on this GPU"
    torch.manual_seed(0)
    E, D, T, K = 8, 64, 256, 2
    bank = ExpertBank(E, D, 128, n_layer=1).cuda()
    with torch.no_grad():
        bank.b1_EF.normal_()
        bank.b2_ED.normal_()
    x = torch.randn(T, D, device="cuda", requires_grad=True)
    ids = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)]).cuda()  # E-1 idle
    weights = torch.rand(T, K, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
        out = bank(x, ids, weights)
    ref = naive_experts(bank, x, ids, weights)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), [x, weights, *bank.parameters()], grad_out)
    want = torch.autograd.grad(ref, [x, weights, *bank.parameters()], grad_out)
    for g, w in zip(got, want):
        # Weight gradients sum over up to T rows: scale the tolerance by their size.
        torch.testing.assert_close(g.float(), w, atol=tol * (1 + w.abs().max().item()),
                                   rtol=tol)
    assert torch.all(got[2][E - 1] == 0)  # the idle expert: a zero gradient


def gpu_run(tmp_path, name, **overrides):
    settings = dict(max_iters=10, eval_interval=5, dropout=0.1) | overrides
    return tiny_config(model_dir=str(tmp_path / name), device="cuda", **settings)


def test_training_steps_lower_the_loss_on_the_gpu(tmp_path):
    result = Trainer(gpu_run(tmp_path, "a", max_iters=30, lr=3e-3)).train()
    losses = result.train_losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])


def test_save_and_resume_on_the_gpu_equal_an_uninterrupted_run(tmp_path):
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        straight = Trainer(gpu_run(tmp_path, "a")).train()
        first = Trainer(gpu_run(tmp_path, "b")).train(stop_at=5)
        second = Trainer(gpu_run(tmp_path, "b"), resume=True).train()
    finally:
        torch.use_deterministic_algorithms(False)
    # Dropout's CUDA generator, the data order and AdamW's moments all continue exactly.
    assert first.train_losses + second.train_losses == straight.train_losses
    a, *_ = checkpoint.load_model(tmp_path / "a")
    b, *_ = checkpoint.load_model(tmp_path / "b")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_kv_cache_logits_equal_the_full_forward_on_the_gpu(dtype, tol):
    torch.manual_seed(0)
    model = HiMoEModel(tiny_config()).cuda().eval()
    cfg = model.cfg
    idx = torch.randint(0, cfg.vocab_size, (2, 16), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
        full, _ = model(idx)
        cache = KVCache(cfg.n_layer, 2, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head,
                        "cuda", dtype)
        pieces = [model(idx[:, :5], cache=cache)[0]]
        for t in range(5, 16):
            pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, 1).float(), full.float(), atol=tol, rtol=tol)


def test_generate_with_the_cache_on_the_gpu():
    torch.manual_seed(1)
    model = HiMoEModel(tiny_config()).cuda().eval()
    prompt = torch.randint(0, 20, (2, 3), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(7)
    out = model.generate(prompt, 50, temperature=1.0, top_k=5, generator=gen)
    assert out.shape == (2, 53) and out.device.type == "cuda"
    assert torch.equal(out[:, :3], prompt)
    assert int(out.max()) < model.cfg.vocab_size
