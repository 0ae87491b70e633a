"""The training loop: batches, AdamW, schedule, evaluation, saves, resume and final outputs."""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from himoe import checkpoint
from himoe.analysis.balance import load_figures
from himoe.analysis.charts import utilisation_chart
from himoe.analysis.routing_log import routing_log
from himoe.config import HiMoEConfig
from himoe.data.corpus import CharTokenizer, get_batch, load_corpus, split_train_val
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.training.allocator import keep_freed_memory
from himoe.training.flops import mfu, peak_flops
from himoe.training.optim import build_optimizer, clip_grad_norm, lr_at


def resolve_device(cfg: HiMoEConfig) -> tuple[torch.device, torch.dtype]:
    """(device, compute dtype). Weights stay fp32; a lower compute dtype runs under autocast.
    bf16 is the default on CUDA only: on CPUs it is far slower than fp32."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; "
                        "use --device cpu or auto")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if use_cuda else "float32")
    return device, getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].copy()),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy(), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainResult:
    step: int
    model_dir: Path
    train_losses: list[float] = field(default_factory=list)  # one per step run here
    evals: list[dict] = field(default_factory=list)


def train_step(forward, optimizer, params, x_BT, y_BT, grad_clip: float) -> torch.Tensor:
    """One optimisation step: forward, backward, clip, AdamW, zero_grad. `himoe bench`
    times exactly this function, so its figures are those of `himoe train`."""
    _, loss = forward(x_BT, y_BT)
    loss.backward()
    clip_grad_norm(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(model: HiMoEModel, data: torch.Tensor, cfg: HiMoEConfig, device, dtype) -> dict:
    """Mean loss over eval_iters fixed batches (same batches at every evaluation, so the
    curve is not noise), plus per-layer expert-load figures."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    moe = model.moe_layers
    counts = {i: torch.zeros(cfg.total_experts, dtype=torch.long) for i in moe}
    dropped = dict.fromkeys(moe, 0)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, gen)
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
        for i, layer in moe.items():
            counts[i] += torch.bincount(layer.last_ids_TK.reshape(-1).cpu(),
                                        minlength=cfg.total_experts)
            dropped[i] += layer.last_dropped
    model.train(was_training)
    val_loss = sum(losses) / len(losses)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
            "layers": [load_figures(counts[i], cfg.num_moes) | {
                "drop_rate": dropped[i] / max(1, int(counts[i].sum()))} for i in sorted(counts)]}


class Trainer:
    def __init__(self, cfg: HiMoEConfig, resume: bool = False, out=sys.stdout):
        self.out = out
        self.model_dir = Path(cfg.model_dir)
        self.device, self.dtype = resolve_device(cfg)
        keep_freed_memory()
        text, corpus_path = load_corpus(cfg.data_file)
        if resume:
            saved_cfg, vocab, self.step = checkpoint.read_config(self.model_dir)
            self.tokenizer = CharTokenizer(vocab)
            missing = self.tokenizer.unknown(text)
            if missing:
                raise UserError(f"corpus {corpus_path} has characters the saved model does not "
                                f"know: {''.join(missing)!r}; resume on the same corpus")
            self.model, _, _, _ = checkpoint.load_model(self.model_dir)
            cfg.vocab_size = saved_cfg.vocab_size
        else:
            checkpoint.check_model_dir_writable(self.model_dir)
            self.tokenizer = CharTokenizer.from_text(text)
            cfg.vocab_size = self.tokenizer.vocab_size
            self.step = 0
            seed_everything(cfg.seed)  # the initial weights depend on the seed alone
            self.model = HiMoEModel(cfg)
        self.cfg = cfg
        self.model.cfg = cfg  # training flags may differ from the saved run's
        self.model.to(self.device)
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        self.train_data, self.val_data = split_train_val(ids, cfg.block_size)
        # The compiled forward shares the model's parameters; evaluation and sampling use
        # the plain model, so switching to eval mode triggers no recompilation.
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(self.model, cfg)
        self.params = list(self.model.parameters())
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        seed_everything(cfg.seed + 1)  # dropout stream, separate from the initial weights
        if resume:
            self._restore_train_state()
        total, active = self.model.parameter_counts()
        self.active_params, self.peak_flops = active, peak_flops(self.device)
        self._print(f"corpus: {corpus_path} ({len(ids):,} tokens, vocabulary "
                    f"{self.tokenizer.vocab_size}); device {self.device}, "
                    f"{str(self.dtype).removeprefix('torch.')}")
        self._print(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per "
                    f"token ({active / total:.1%})")

    def _print(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    # --- state for --resume ---
    def _train_state(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "data_generator": self.data_gen.get_state(), "rng": rng_state()}

    def _restore_train_state(self) -> None:
        path = self.model_dir / checkpoint.TRAIN_STATE_FILE
        if not path.is_file():
            raise UserError(f"{path} is missing, so training cannot resume exactly; "
                            "drop --resume to start a new run")
        state = checkpoint.load_weight_file(path)
        if state.get("step") != self.step:
            raise UserError(f"{path} is for step {state.get('step')} but config.json says "
                            f"{self.step}; the last save was interrupted, re-run without --resume")
        self.optimizer.load_state_dict(state["optimizer"])
        self.data_gen.set_state(state["data_generator"])
        set_rng_state(state["rng"])

    def save(self) -> None:
        checkpoint.save_model(self.model, self.tokenizer.chars, self.step, self.model_dir)
        checkpoint.atomic_save(self._train_state(), self.model_dir / checkpoint.TRAIN_STATE_FILE)

    # --- the loop ---
    def train(self, stop_at: int | None = None) -> TrainResult:
        cfg, model = self.cfg, self.model
        if self.step >= cfg.max_iters:
            raise UserError(f"the model in {self.model_dir} is already at step {self.step} of "
                            f"--max_iters {cfg.max_iters}; pass a larger --max_iters")
        result = TrainResult(self.step, self.model_dir)
        tokens_per_step = cfg.batch_size * cfg.block_size
        model.train()
        bar = tqdm(total=cfg.max_iters, initial=self.step, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        step_time, window_losses, window_aux = 0.0, [], {}
        while self.step < cfg.max_iters:
            lr = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if cfg.intra_warmup:
                model.set_intra_scale(min(1.0, self.step / cfg.intra_warmup))
            t0 = time.perf_counter()
            x, y = get_batch(self.train_data, cfg.batch_size, cfg.block_size, self.data_gen)
            with autocast(self.device, self.dtype):
                loss = train_step(self.forward, self.optimizer, self.params,
                                  x.to(self.device), y.to(self.device), cfg.grad_clip)
            for name, value in model.aux_losses().items():
                window_aux[name] = window_aux.get(name, 0.0) + value
            loss_value = loss.item()
            step_time += time.perf_counter() - t0
            if not math.isfinite(loss_value):
                bar.close()
                raise UserError(f"loss became {loss_value} at step {self.step + 1}; lower --lr "
                                f"and resume from the last save in {self.model_dir}")
            self.step += 1
            result.train_losses.append(loss_value)
            window_losses.append(loss_value)
            tok_s = len(window_losses) * tokens_per_step / max(step_time, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                            refresh=False)
            bar.update(1)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                ev = evaluate(model, self.val_data, cfg, self.device, self.dtype)
                ev.update(step=self.step, lr=lr, tokens_per_s=tok_s,
                          train_loss=sum(window_losses) / len(window_losses),
                          aux={k: v / len(window_losses) for k, v in window_aux.items()},
                          mfu=mfu(cfg, self.active_params, tok_s, self.peak_flops))
                bar.write(f"step {self.step}: train loss {ev['train_loss']:.4f}, val loss "
                          f"{ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}), {tok_s:,.0f} tok/s",
                          file=self.out)
                self.save()
                with open(self.model_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(ev) + "\n")
                result.evals.append(ev)
                step_time, window_losses, window_aux = 0.0, [], {}
            if stop_at is not None and self.step >= stop_at:
                break
        bar.close()
        result.step = self.step
        if self.step >= cfg.max_iters:
            self.finish(result.evals[-1])
        return result

    def finish(self, last_eval: dict) -> None:
        """The card's end-of-training outputs: chart, sample.txt, routing_log.json."""
        if self.model.moe_layers:
            self._print(utilisation_chart(last_eval["layers"], self.cfg.num_experts))
        text, log = write_sample(self.model, self.tokenizer, self.cfg, self.model_dir,
                                 self.device)
        self._print(f"sample ({self.cfg.sample_tokens} tokens) written to "
                    f"{self.model_dir / 'sample.txt'}:\n{text[:300]}")
        if log is not None:
            self._print(f"routing of the first {len(log)} generated tokens written to "
                        f"{self.model_dir / 'routing_log.json'}")


def write_sample(model: HiMoEModel, tokenizer: CharTokenizer, cfg: HiMoEConfig,
                 model_dir: Path, device) -> tuple[str, list | None]:
    """sample.txt: sample_tokens tokens from a blank context; routing_log.json: the routing
    of the first 50 of them."""
    model.eval()
    context = [tokenizer.blank_token()]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(torch.tensor([context], device=device), cfg.sample_tokens,
                         generator=gen)
    generated = out[0, len(context):].tolist()
    text = tokenizer.decode(generated)
    checkpoint.atomic_write_text(text, model_dir / "sample.txt")
    log = None
    if model.moe_layers:
        log = routing_log(model, context, generated, tokenizer.decode)
        checkpoint.atomic_write_text(json.dumps(log, indent=1), model_dir / "routing_log.json")
    return text, log
