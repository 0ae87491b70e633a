"""In-place expert gradients (himoe.model.grad_sink) against autograd's own accumulation."""

import pytest
import torch

from himoe.model import HiMoEModel
from himoe.model.experts import ExpertBank
from himoe.model.grad_sink import grad_parts, zero_grads
from himoe.training.optim import build_optimizer, grad_norm
from himoe.training.step import train_step, write_expert_grads_in_place
from tests.conftest import tiny_config

E, D, T = 6, 16, 24
# Which experts get tokens, step by step: some go idle (their stale slices must read zero),
# some come back (overwritten, not added to), some stay (overwritten each step).
ACTIVE = [[0, 1, 2], [2, 3], [0, 5], [0, 5], [1]]


def bank_pair():
    torch.manual_seed(0)
    plain = ExpertBank(E, D, 32, n_layer=1)
    sunk = ExpertBank(E, D, 32, n_layer=1)
    sunk.load_state_dict(plain.state_dict())
    sunk.write_grads_in_place()
    return plain, sunk


def recycle(bank):
    """zero_grads for a bare bank: the sinks keep their tensors, the biases are dropped."""
    for sink in bank.grad_sinks:
        sink.recycle()
    bank.zero_grad(set_to_none=True)


def backward(bank, experts, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    ids = torch.tensor(experts)[torch.randint(len(experts), (T, 1), generator=gen)]
    weights = torch.rand(T, 1, generator=gen)
    bank(x, ids, weights).square().sum().backward()


def test_gradients_equal_autograds_step_after_step():
    plain, sunk = bank_pair()
    for step, experts in enumerate(ACTIVE):
        for bank in (plain, sunk):
            backward(bank, experts, seed=step)
        for p, q in zip(plain.parameters(), sunk.parameters()):
            assert torch.equal(p.grad, q.grad), (step, p.shape)
        # Only the experts with tokens are listed for the norm, and the norm is the same.
        # Consecutive experts come as one slice (one norm call).
        parts = grad_parts(sunk.w1_EDF)
        firsts = [part.storage_offset() // part[0].numel() for part in parts]
        assert [f + i for f, part in zip(firsts, parts) for i in range(len(part))] == experts
        assert len(parts) == sum(e - 1 not in experts for e in experts)
        torch.testing.assert_close(grad_norm([p.grad for p in plain.parameters()]),
                                   grad_norm([g for q in sunk.parameters()
                                              for g in grad_parts(q)]), rtol=1e-6, atol=0)
        plain.zero_grad(set_to_none=True)
        recycle(sunk)
        assert sunk.w1_EDF.grad is None  # zero_grad's contract between steps still holds


def test_backward_calls_within_a_step_accumulate():
    plain, sunk = bank_pair()
    for bank in (plain, sunk):
        backward(bank, [0, 1], seed=0)
        backward(bank, [1, 4], seed=1)  # expert 1 twice: added to; expert 4 new: written
    for p, q in zip(plain.parameters(), sunk.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("reset", ["recycled", "set_to_none", "in_place_zero", "replaced"])
def test_gradients_reset_by_someone_else_are_respected(reset):
    """Between two steps .grad may be recycled (zero_grads), dropped or zeroed by
    zero_grad, or replaced by the user: the next backward must start from what is there."""
    plain, sunk = bank_pair()
    for bank in (plain, sunk):
        backward(bank, [0, 1, 2], seed=0)
        if reset == "recycled":
            recycle(bank)
        elif reset == "replaced":
            for p in bank.parameters():
                p.grad = torch.full_like(p, 0.5)
        else:
            bank.zero_grad(set_to_none=reset == "set_to_none")
        backward(bank, [2, 3], seed=1)
    for p, q in zip(plain.parameters(), sunk.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_training_with_sinks_equals_training_without():
    """train_step with in-place expert gradients: the same losses and weights as autograd's
    accumulation, over steps where the routing moves."""
    cfg = tiny_config(max_iters=6, dropout=0.0)
    runs = []
    for sinks in (False, True):
        torch.manual_seed(0)
        model = HiMoEModel(cfg)
        if sinks:
            write_expert_grads_in_place(model)
        optimizer = build_optimizer(model, cfg)
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(6):
            x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), generator=gen)
            y = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), generator=gen)
            loss = train_step(model, optimizer, params, x, y, grad_clip=cfg.grad_clip)
            losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][key], value, rtol=1e-5, atol=1e-7)


def test_zero_grads_keeps_the_sink_tensor_for_the_next_step():
    cfg = tiny_config()
    model = HiMoEModel(cfg)
    write_expert_grads_in_place(model)
    optimizer = build_optimizer(model, cfg)
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    bank = model.moe_layers[0].experts
    model(x, x)[1].backward()
    first = bank.w1_EDF.grad
    zero_grads(model, optimizer)
    assert bank.w1_EDF.grad is None and all(p.grad is None for p in model.parameters())
    model(x, x)[1].backward()
    assert bank.w1_EDF.grad is first  # reused: no new 4-byte-per-weight allocation
