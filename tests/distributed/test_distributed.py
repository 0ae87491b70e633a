"""torch.distributed training on the CPU (gloo): two processes give the losses, gradients
and saved weights of one process running the same global batch."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from himoe.checkpoint.card import load_model
from himoe.checkpoint.verify import verify
from himoe.distributed.plan import Parallel
from himoe.training.trainer import Trainer
from tests.conftest import tiny_config

# switch_coef 0: the Switch loss (on by default) is computed on each rank's and each
# micro-batch's own tokens, as in Megatron and DeepSpeed, so a batch split another way
# gives another loss; the equalities below are of the parallel mechanics without it.
FLAGS = dict(n_embd=32, n_layer=2, n_head=2, block_size=16, num_moes=2, num_experts=2,
             dropout=0.0, batch_size=8, max_iters=3, eval_interval=1, eval_iters=2,
             warmup_iters=1, sample_tokens=20, device="cpu", switch_coef=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cli(model_dir: Path, nproc: int = 1, *extra: str, **flags) -> None:
    """`himoe train` with FLAGS, alone or under torchrun with nproc CPU processes."""
    args = [f"--{k}={v}" for k, v in (FLAGS | flags).items()]
    args += ["--model_dir", str(model_dir), *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "himoe", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "himoe", "train", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(model_dir: Path) -> list[float]:
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def files(model_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """One-process runs, made once per set of flags."""
    runs = {}

    def run(extra: tuple, flags: dict) -> Path:
        key = (extra, tuple(sorted(flags.items())))
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("single")
            train_cli(runs[key], 1, *extra, **flags)
        return runs[key]
    return run


# (flags of the two-process run, of the one-process run, flags for both): the grouped
# router's logit EMA and loss-free balancing counts are synchronised over ranks, and
# micro-batch i covers the same rows whatever the number of processes.
ACCUM = ("--grad_accum", "2")
CASES = {"ddp": ((), (), {}),
         "ddp_grouped_accum": (ACCUM, ACCUM, dict(router="grouped")),
         "expert_parallel_lossfree": (("--expert_parallel", "2"), (),
                                      dict(bias_update_rate=0.01)),
         "fsdp": (("--fsdp",), (), {})}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one(single_runs, tmp_path, case):
    mode, single_mode, flags = CASES[case]
    single_run = single_runs(single_mode, flags)
    model_dir = tmp_path / "two"
    done = train_cli(model_dir, 2, *mode, **flags)
    assert losses(model_dir) == pytest.approx(losses(single_run), rel=1e-5)
    assert files(model_dir) == files(single_run)  # the card's layout, written once
    problems, _ = verify(model_dir)
    assert problems == []
    one, two = load_model(single_run)[0].state_dict(), load_model(model_dir)[0].state_dict()
    for key, want in one.items():
        torch.testing.assert_close(two[key], want, rtol=1e-4, atol=1e-6, msg=key)
    assert done.stdout.count("step 3: train loss") == 1  # rank 0 alone reports
    # train_state.pt has one layout whatever the mode: the sharded modes resume under
    # torchrun (their own optimizer-state loading), the others in one process.
    if "--fsdp" in mode or "--expert_parallel" in mode:
        train_cli(model_dir, 2, *mode, "--resume", **flags | dict(max_iters=4))
        assert len(losses(model_dir)) == 4 and verify(model_dir)[0] == []
    else:
        resumed = Trainer(tiny_config(**FLAGS | flags | dict(
            max_iters=4, model_dir=str(model_dir), vocab_size=0)), resume=True,
            out=io.StringIO()).train()
        assert resumed.step == 4


@pytest.mark.slow
def test_grad_accum_equals_one_batch(tmp_path):
    cfg = tiny_config(max_iters=4, eval_interval=2, batch_size=8, switch_coef=0.0)  # see FLAGS
    plain = Trainer(dataclasses.replace(cfg, model_dir=str(tmp_path / "a")),
                    out=io.StringIO()).train()
    accum = Trainer(dataclasses.replace(cfg, model_dir=str(tmp_path / "b")), out=io.StringIO(),
                    parallel=Parallel(grad_accum=4)).train()
    assert accum.train_losses == pytest.approx(plain.train_losses, rel=1e-5)
    a, b = (load_model(tmp_path / d)[0].state_dict() for d in "ab")
    for key in a:
        if key.endswith("attn.qkv.bias"):
            # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift
            # every key shares), so AdamW scales its rounding noise, of either sign, up to
            # ~1e-6 whatever the batching: the query and value biases are held to the rest.
            keys = slice(cfg.n_embd, 2 * cfg.n_embd)
            torch.testing.assert_close(b[key][keys], a[key][keys], rtol=0, atol=1e-5, msg=key)
            b[key][keys] = a[key][keys]
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


# --- expert-parallel gradients, in two spawned gloo processes ---

def _ep_worker(rank: int, world: int, port: int, cfg, state, x_BT, y_BT, want, route_to_0):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from himoe.model import HiMoEModel

        model = HiMoEModel(cfg)
        model.load_state_dict(state)
        parallel = Parallel("expert_parallel", rank=rank, world=world)
        parallel.place(model, torch.device("cpu"))
        loss = parallel.forward_backward(model, x_BT, y_BT)
        assert float(loss) == pytest.approx(want["loss"], rel=1e-5)
        grads = {name: p.grad for name, p in model.named_parameters()}
        for layer, moe in model.moe_layers.items():
            for name, p in moe.experts.named_parameters():
                key = f"blocks.{layer}.ffn.experts.{name}"
                assert p.grad is not None, key  # idle experts: zero, not None
                parts = [torch.empty_like(p.grad) for _ in range(world)]
                dist.all_gather(parts, p.grad)
                grads[key] = torch.cat(parts)
                if route_to_0 and rank == 1:
                    assert not p.grad.any(), key
        for key, g in want["grads"].items():
            torch.testing.assert_close(grads[key], g, rtol=1e-4, atol=1e-7, msg=key)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("route_to_0", [False, True], ids=["routed", "rank1_idle"])
def test_expert_parallel_gradients(route_to_0):
    from himoe.model import HiMoEModel

    cfg = tiny_config(num_moes=2, num_experts=2, top_k_experts=2, switch_coef=0.0)  # see FLAGS
    torch.manual_seed(0)
    model = HiMoEModel(cfg)
    if route_to_0:  # every token picks group 1: rank 1's experts get no token at all
        with torch.no_grad():
            for moe in model.moe_layers.values():
                moe.router.group_bias_N.copy_(torch.tensor([10.0, 0.0]))
    x_BT = torch.randint(cfg.vocab_size, (4, cfg.block_size))
    y_BT = torch.randint(cfg.vocab_size, (4, cfg.block_size))
    _, loss = model(x_BT, y_BT)
    loss.backward()
    want = {"loss": float(loss.detach()), "grads": {n: p.grad.clone() for n, p in
                                          model.named_parameters()}}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_ep_worker, args=(2, free_port(), cfg, state, x_BT, y_BT, want, route_to_0),
             nprocs=2)


@pytest.mark.parametrize("argv, says", [
    (["--fsdp"], "torchrun"),
    (["--expert_parallel", "2"], "torchrun"),
    (["--expert_parallel", "0"], "--expert_parallel must be >= 1"),
    (["--grad_accum", "3"], "--batch_size 8 does not split"),
    (["--grad_accum", "0"], "--grad_accum must be >= 1"),
])
def test_bad_parallel_flags(tmp_path, capsys, argv, says):
    from himoe.cli import main

    args = [f"--{k}={v}" for k, v in FLAGS.items()] + ["--model_dir", str(tmp_path / "m")]
    assert main(["train", *args, *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
