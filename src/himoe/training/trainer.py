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

from himoe.analysis.balance import collapse_warning, load_figures, max_violation
from himoe.analysis.charts import utilisation_chart
from himoe.analysis.routing_log import routing_log
from himoe.analysis.training_plots import training_plots
from himoe.checkpoint import atomic_dir, safe_path
from himoe.checkpoint import card as checkpoint
from himoe.config import HiMoEConfig
from himoe.data.batches import get_batch
from himoe.data.corpora import new_tokenizer, open_corpus, token_splits, unknown_chars
from himoe.data.tokenizers import tokenizer_for
from himoe.distributed.plan import Discard, Parallel
from himoe.edit.specs import spec_files
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.model.grad_sink import zero_grads
from himoe.model.routers.registry import router_spec
from himoe.training.allocator import keep_freed_memory
from himoe.training.flops import mfu, peak_flops
from himoe.training.freeze import Freezer
from himoe.training.memory import check_training_fits
from himoe.training.optim import build_optimizer, set_scheduled_lr
from himoe.training.tensorboard_log import TensorBoardLog, require_tensorboard


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
    np.random.seed(seed % 2**32)  # numpy takes 32 bits; --seed goes up to 2^63 - 1
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


class NonFiniteStep(Exception):
    """train_step found a non-finite loss or gradient norm and applied no update."""

    def __init__(self, loss: float, grad_norm: float):
        super().__init__(f"loss {loss}, gradient norm {grad_norm}")
        self.loss, self.grad_norm = loss, grad_norm


def routing_schedule(cfg: HiMoEConfig) -> str:
    """Which balancing acts when, in the Hi-MoE paper's two stages: stage 1 at routing time
    (selection-side corrections), stage 2 in the loss (R_intra ramped in last)."""
    stage1 = list(router_spec(cfg.router).selection(cfg))
    if cfg.bias_update_rate:
        stage1.append(f"loss-free selection bias (u {cfg.bias_update_rate})")
    if cfg.capacity_factor:
        stage1.append(f"capacity factor {cfg.capacity_factor}")
    stage2 = [f"{name} {coef}" for name, coef in (("Switch", cfg.switch_coef),
              ("z-loss", cfg.z_coef), ("R_inter", cfg.inter_coef)) if coef]
    if cfg.intra_coef:
        ramp = f", ramped in over steps 0-{cfg.intra_warmup}" if cfg.intra_warmup else ""
        stage2.append(f"R_intra {cfg.intra_coef}{ramp}")
    if not stage1 and not stage2:
        return ""
    return (f"routing stage 1 (selection): {'; '.join(stage1) or 'none'}\n"
            f"routing stage 2 (loss, {cfg.reg_form} form): {'; '.join(stage2) or 'none'}")


def write_expert_grads_in_place(model: HiMoEModel) -> None:
    """Idle experts cost no gradient writes or norm reads (himoe.model.grad_sink); only for
    one process, where no DDP, FSDP or --train_only hook needs to see those gradients."""
    for moe in model.moe_layers.values():
        moe.experts.write_grads_in_place()


def train_step(model: HiMoEModel, optimizer, params, x_BT, y_BT, forward=None,
               parallel: Parallel | None = None) -> torch.Tensor:
    """One optimisation step: forward, backward, clip, AdamW, zero_grad, then the loss-free
    balancing update. `himoe bench` times exactly this function, so its figures are those
    of `himoe train`. forward: a compiled (or DDP) version of model, if any. parallel: how
    the step is split into micro-batches and ranks (default: one process, one batch)."""
    parallel = parallel or Parallel()
    loss = parallel.forward_backward(forward or model, x_BT, y_BT)
    norm = parallel.clip_grad_norm(params, model.cfg.grad_clip, optimizer)
    try:
        # A non-finite loss or gradient norm must never reach the weights or AdamW's
        # moments. One host sync; the caller reads the loss every step anyway.
        if not bool(torch.isfinite(torch.stack([loss.detach().float(), norm.float()])).all()):
            zero_grads(model, optimizer)
            raise NonFiniteStep(loss.item(), float(norm))
        optimizer.step()
    finally:
        optimizer.grad_scale = None  # a clip left to this step (scale_gradients): once
    zero_grads(model, optimizer)
    if model.cfg.bias_update_rate:
        parallel.sync_balance_counts(model)
        model.update_balance_biases()
    return loss


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
    batch_maxvio = {i: [] for i in moe}
    entropy = {i: [] for i in moe}
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, gen)
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
        for i, layer in moe.items():
            batch_E = torch.bincount(layer.last_ids_TK.reshape(-1).cpu(),
                                     minlength=cfg.total_experts)
            counts[i] += batch_E
            batch_maxvio[i].append(max_violation(batch_E[cfg.real_slots(i)]))
            entropy[i].append(layer.last_entropy)
            dropped[i] += layer.last_dropped
    model.train(was_training)
    val_loss = sum(losses) / len(losses)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
            "layers": [load_figures(counts[i], cfg.num_moes, cfg.group_sizes(i)) | {
                "batch_maxvio": sum(batch_maxvio[i]) / len(batch_maxvio[i]),
                "routing_entropy": sum(entropy[i]) / len(entropy[i]),
                "drop_rate": dropped[i] / max(1, int(counts[i].sum()))} for i in sorted(counts)]}


def flag_collapse(layers: list[dict], cfg: HiMoEConfig) -> list[str]:
    """Marks each layer's figures with "collapsed" (kept in metrics.jsonl) and returns one
    warning line per collapsed layer, naming the flag that balances this router."""
    hint = router_spec(cfg.router).balance_hint
    warnings = []
    for i, figures in enumerate(layers, start=1):
        warning = collapse_warning(i, figures, hint)
        figures["collapsed"] = warning is not None
        if warning:
            warnings.append(warning)
    return warnings


class Trainer:
    def __init__(self, cfg: HiMoEConfig, resume: bool = False, out=None,
                 skip_nonfinite: bool = False, train_only: str | None = None,
                 parallel: Parallel | None = None, force: bool = False):
        # parallel: this process's part in a torchrun job (himoe.distributed); only rank 0
        # prints, shows the bar and writes files.
        self.parallel = parallel = parallel or Parallel()
        self.out = out if out is not None else sys.stdout  # the stdout of now, not of import
        if not parallel.is_main:
            self.out = Discard()
        # train_only: a SPEC (himoe.edit.specs); only those weight files train, the rest stay exact.
        if train_only is not None and not resume:
            raise UserError("--train_only fine-tunes parts of a saved model; add --resume "
                            "(and a larger --max_iters)")
        self.freezer: Freezer | None = None
        checkpoint.check_model_dir_flag(cfg.model_dir)
        self.model_dir = Path(cfg.model_dir)
        # skip_nonfinite: a step with a non-finite loss or gradient norm is skipped (no
        # update, counted) instead of stopping the run.
        self.skip_nonfinite, self.skipped_steps = skip_nonfinite, 0
        self.device, self.dtype = resolve_device(cfg)
        check_training_fits(cfg, self.device)  # an absurd batch: one line, not an OOM kill
        if cfg.log == "tensorboard":
            require_tensorboard()  # refused before any work when the package is missing
        keep_freed_memory()
        corpus = open_corpus(cfg.data_file)  # documents, or a prepared directory
        self.corpus_sha256 = corpus.sha256()
        checkpoint.check_model_dir_writable(self.model_dir)
        # force: a new model may replace the one in model_dir (never a folder of other files).
        self._lock = self._lock_model_dir(resume, force)
        try:
            self._load(cfg, corpus, resume, train_only)
        except BaseException:
            self._lock.release()
            raise

    def _lock_model_dir(self, resume: bool, force: bool) -> atomic_dir.WriterLock:
        """The writer lock, held until train() ends: a second writer stops at once. What
        would refuse the directory is checked before the lock file is made in it, and the
        overwrite check again under the lock."""
        if not resume:
            checkpoint.check_new_model_dir(self.model_dir, force)
        else:
            checkpoint.read_config(self.model_dir)  # no model there: say so first
        if self.model_dir.exists():  # nothing planted that a save would write through
            safe_path.check_tree(self.model_dir)
        lock = atomic_dir.WriterLock(self.model_dir, create=not resume)
        if self.parallel.is_main:  # the one rank that writes
            lock.acquire()
            if not resume:
                try:
                    checkpoint.check_new_model_dir(self.model_dir, force)
                except UserError:
                    lock.release()
                    raise
        return lock

    def __del__(self):
        with contextlib.suppress(Exception):
            self._lock.release()

    def _load(self, cfg: HiMoEConfig, corpus, resume: bool, train_only: str | None) -> None:
        parallel = self.parallel
        self.metrics_lines: list[str] = []  # metrics.jsonl, saved with each checkpoint
        if resume:
            saved_cfg, vocab, self.step = checkpoint.read_config(self.model_dir)
            self.tokenizer = tokenizer_for(saved_cfg, vocab, self.model_dir)
            missing = unknown_chars(corpus, self.tokenizer)
            if missing:
                raise UserError(f"corpus {corpus.source} has characters the saved model does not "
                                f"know: {''.join(missing)!r}; resume on the same corpus")
            self.model, _, _, _ = checkpoint.load_model(self.model_dir)
            cfg.vocab_size = saved_cfg.vocab_size
            self.metrics_lines = checkpoint.read_metrics(self.model_dir, self.step)
        else:
            self.tokenizer = new_tokenizer(cfg, corpus)
            cfg.vocab_size = self.tokenizer.vocab_size
            self.step = 0
            seed_everything(cfg.seed)  # the initial weights depend on the seed alone
            self.model = HiMoEModel(cfg)
        parallel.check(cfg, train_only)
        self.cfg = cfg
        self.model.cfg = cfg  # training flags may differ from the saved run's
        total, active = self.model.parameter_counts()  # of the whole model, before sharding
        parallel.place(self.model, self.device)
        self.train_data, self.val_data = token_splits(corpus, self.tokenizer, cfg.block_size)
        # The compiled forward shares the model's parameters; evaluation and sampling use
        # the plain model, so switching to eval mode triggers no recompilation.
        if train_only is not None:
            self.freezer = Freezer(self.model, set(spec_files(train_only, cfg, "--train_only")))
            self._print(self.freezer.summary())
        if parallel.mode == "single" and self.freezer is None:
            write_expert_grads_in_place(self.model)  # nothing hooks the expert gradients
        forward = parallel.wrap(self.model, self.device)
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.optimizer = build_optimizer(self.model, cfg)
        self.params = list(self.model.parameters())
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank
        seed_everything(cfg.seed + 1)  # dropout stream, separate from the initial weights
        if resume:
            self._restore_train_state()
        if parallel.rank:  # each rank its own dropout masks
            seed_everything(cfg.seed + 1 + 1_000_003 * parallel.rank + self.step)
        self.saved_step = self.step if resume else None
        self.active_params, self.peak_flops = active, peak_flops(self.device)
        n_tokens = len(self.train_data) + len(self.val_data)
        self._print(f"corpus: {corpus.label} ({n_tokens:,} tokens, vocabulary "
                    f"{self.tokenizer.vocab_size}); device {self.device}, "
                    f"{str(self.dtype).removeprefix('torch.')}")
        self._print(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per "
                    f"token ({active / total:.1%})")
        schedule = routing_schedule(cfg)
        if schedule:
            self._print(schedule)

    def _print(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    # --- state for --resume ---
    def _train_state(self) -> dict:
        return {"step": self.step,
                "optimizer": self.parallel.optimizer_state(self.model, self.optimizer),
                "data_generator": self.data_gen.get_state(), "rng": rng_state(),
                "skipped_steps": self.skipped_steps, "corpus_sha256": self.corpus_sha256}

    def _restore_train_state(self) -> None:
        path = self.model_dir / checkpoint.TRAIN_STATE_FILE
        if safe_path.lstat(self.model_dir, checkpoint.TRAIN_STATE_FILE) is None:
            raise UserError(f"{path} is missing, so training cannot resume exactly; "
                            "drop --resume to start a new run")
        state = checkpoint.load_weight_file(self.model_dir, checkpoint.TRAIN_STATE_FILE,
                                            plain=False)
        if state.get("step") != self.step:
            raise UserError(f"{path} is for step {state.get('step')} but config.json says "
                            f"{self.step}; the last save was interrupted, re-run without --resume")
        self.parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.data_gen.set_state(state["data_generator"])
        set_rng_state(state["rng"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("corpus_sha256", self.corpus_sha256) != self.corpus_sha256:
            self._print("note: the corpus differs from the one this run was trained on, so "
                        "the resumed run will not equal an uninterrupted one")

    def save(self) -> None:
        """Weights, config.json, train_state.pt and metrics.jsonl in one atomic save, so
        that they always belong to the same step. Under torchrun every rank takes part in
        gathering the weights and optimizer state, and rank 0 alone writes."""
        model, train_state = self.parallel.full_model(self.model), self._train_state()
        if not self.parallel.is_main:
            self.saved_step = self.step
            return
        try:
            checkpoint.save_model(model, self.tokenizer.vocab, self.step, self.model_dir,
                                  extra={checkpoint.TRAIN_STATE_FILE: train_state,
                                         checkpoint.METRICS_FILE: "".join(self.metrics_lines),
                                         **self.tokenizer.files()},
                                  keep=self.freezer.frozen_files if self.freezer else ())
        except BaseException:
            if getattr(self, "bar", None) is not None:
                self.bar.close()  # so that the error starts on a line of its own
            raise
        self.saved_step = self.step

    # --- the loop ---
    def train(self, stop_at: int | None = None) -> TrainResult:
        if self.parallel.is_main:
            self._lock.acquire()  # held since __init__, unless an earlier train() ended
        try:
            return self._train(stop_at)
        finally:
            self._lock.release()

    def _train(self, stop_at: int | None) -> TrainResult:
        cfg, model = self.cfg, self.model
        if self.step >= cfg.max_iters:
            raise UserError(f"the model in {self.model_dir} is already at step {self.step} of "
                            f"--max_iters {cfg.max_iters}; pass a larger --max_iters")
        result = TrainResult(self.step, self.model_dir)
        tokens_per_step = cfg.batch_size * cfg.block_size
        model.train()
        tb = None
        if cfg.log == "tensorboard" and self.parallel.is_main:  # one writer under torchrun
            tb = TensorBoardLog(Path(cfg.log_dir) if cfg.log_dir else self.model_dir / "tb")
        bar = self.bar = tqdm(total=cfg.max_iters, initial=self.step, desc="train",
                              unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
                              disable=not self.parallel.is_main)
        step_time, window_steps, window_losses, window_aux = 0.0, 0, [], {}
        while self.step < cfg.max_iters:
            lr = set_scheduled_lr(self.optimizer, self.step, cfg)
            if cfg.intra_warmup:
                model.set_intra_scale(min(1.0, self.step / cfg.intra_warmup))
            t0 = time.perf_counter()
            x, y = get_batch(self.train_data, cfg.batch_size, cfg.block_size, self.data_gen)
            # The forward may update router buffers (e.g. a logit EMA): a skipped step undoes it.
            buffers = [b.clone() for b in model.buffers()] if self.skip_nonfinite else None
            try:
                with autocast(self.device, self.dtype):
                    loss = train_step(model, self.optimizer, self.params, x.to(self.device),
                                      y.to(self.device), self.forward, self.parallel)
                loss_value = loss.item()
            except NonFiniteStep as bad:
                self._skip_or_stop(bad, bar, buffers)  # raises unless --skip_nonfinite
                loss_value = bad.loss
            else:
                for name, value in model.aux_losses().items():
                    window_aux[name] = window_aux.get(name, 0.0) + value
                window_losses.append(loss_value)
            if self.freezer is not None:  # AdamW may have moved frozen rows: put them back
                self.freezer.after_step()
            step_time += time.perf_counter() - t0
            self.step += 1
            window_steps += 1
            result.train_losses.append(loss_value)
            if tb is not None:
                tb.step(self.step, loss_value, lr)
            tok_s = window_steps * tokens_per_step / max(step_time, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                            refresh=False)
            bar.update(1)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                ev = evaluate(model, self.val_data, cfg, self.device, self.dtype)
                done = max(1, len(window_losses))  # steps of this window that were not skipped
                ev.update(step=self.step, lr=lr, tokens_per_s=tok_s,
                          train_loss=sum(window_losses) / len(window_losses) if window_losses
                          else float("nan"),
                          aux={k: v / done for k, v in window_aux.items()},
                          mfu=mfu(cfg, self.active_params, tok_s, self.peak_flops),
                          skipped_steps=self.skipped_steps)
                bar.write(f"step {self.step}: train loss {ev['train_loss']:.4f}, val loss "
                          f"{ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}), {tok_s:,.0f} tok/s",
                          file=self.out)
                for warning in flag_collapse(ev["layers"], cfg):
                    bar.write(warning, file=self.out)
                self.metrics_lines.append(json.dumps(ev) + "\n")
                if tb is not None:
                    tb.evaluation(ev)
                self.save()
                result.evals.append(ev)
                step_time, window_steps, window_losses, window_aux = 0.0, 0, [], {}
            if stop_at is not None and self.step >= stop_at:
                break
        bar.close()
        if tb is not None:
            tb.close()
        result.step = self.step
        if self.step >= cfg.max_iters:
            self.finish(result.evals[-1])
        return result

    def _skip_or_stop(self, bad: NonFiniteStep, bar, buffers: list | None) -> None:
        step = self.step + 1
        if not self.skip_nonfinite:
            bar.close()
            kept = (f"the last good checkpoint in {self.model_dir} (step {self.saved_step}) is "
                    "kept" if self.saved_step is not None else "no checkpoint was saved yet")
            raise UserError(f"step {step} gave a non-finite {bad}; stopped before updating the "
                            f"weights, {kept}; lower --lr and --resume, or pass --skip_nonfinite "
                            "to skip such steps")
        for buffer, before in zip(self.model.buffers(), buffers):
            buffer.copy_(before)
        self.skipped_steps += 1
        bar.write(f"step {step}: non-finite {bad}; update skipped ({self.skipped_steps} "
                  "skipped so far)", file=self.out)

    def finish(self, last_eval: dict) -> None:
        """The card's end-of-training outputs: chart, sample.txt, routing_log.json."""
        if self.model.moe_layers:
            self._print(utilisation_chart(last_eval["layers"], self.cfg.num_experts))
        # Every rank generates (sharded models need all of them); rank 0 writes.
        text, log = write_sample(self.model, self.tokenizer, self.cfg, self.model_dir,
                                 self.device, write=self.parallel.is_main)
        self._print(f"sample ({self.cfg.sample_tokens} tokens) written to "
                    f"{self.model_dir / 'sample.txt'}:\n{text[:300]}")
        if log is not None:
            self._print(f"routing of the first {len(log)} generated tokens written to "
                        f"{self.model_dir / 'routing_log.json'}")
        if self.parallel.is_main:
            pngs, note = training_plots(self.metrics_lines, last_eval, self.cfg.num_experts,
                                        self.model_dir)
            self._print(note or f"plots written to {', '.join(str(p) for p in pngs)}")


def write_sample(model: HiMoEModel, tokenizer, cfg: HiMoEConfig,
                 model_dir: Path, device, write: bool = True) -> tuple[str, list | None]:
    """sample.txt: sample_tokens tokens from a blank context; routing_log.json: the routing
    of the first 50 of them."""
    model.eval()
    context = [tokenizer.blank_token()]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(torch.tensor([context], device=device), cfg.sample_tokens,
                         generator=gen)
    generated = out[0, len(context):].tolist()
    text = tokenizer.decode(generated)
    if write:
        checkpoint.atomic_write_text(text, model_dir / "sample.txt")
    log = None
    if model.moe_layers:
        log = routing_log(model, context, generated, tokenizer.decode)
        if write:
            checkpoint.atomic_write_text(json.dumps(log, indent=1),
                                         model_dir / "routing_log.json")
    return text, log
