"""The training loop: batches, AdamW, schedule, evaluation, saves, resume and final outputs.

A new run and a resumed one differ only in where the model, tokenizer and step come from
(new_start, resumed_start); Trainer.new and Trainer.resume name the two."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from himoe.analysis.charts import utilisation_chart
from himoe.analysis.training_plots import training_plots
from himoe.checkpoint import atomic_dir, safe_path
from himoe.checkpoint import card as checkpoint
from himoe.config import HiMoEConfig
from himoe.data.batches import get_batch
from himoe.data.corpora import new_tokenizer, open_corpus, token_splits, unknown_chars
from himoe.data.documents import Corpus
from himoe.data.shards import PreparedCorpus
from himoe.data.tokenizers import tokenizer_for
from himoe.distributed.plan import Discard, Parallel
from himoe.edit.specs import spec_files
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.training.allocator import FreedMemoryWatch, keep_freed_memory
from himoe.training.device import autocast, resolve_device
from himoe.training.evaluation import evaluate, flag_collapse
from himoe.training.flops import mfu, peak_flops
from himoe.training.freeze import Freezer
from himoe.training.memory import check_training_fits
from himoe.training.optim import (
    bias_rate_at,
    build_optimizer,
    check_lr_scales,
    set_scheduled_lr,
)
from himoe.training.outputs import routing_schedule, write_sample
from himoe.training.rng import rng_state, seed_everything, set_rng_state
from himoe.training.step import NonFiniteStep, train_step, write_expert_grads_in_place
from himoe.training.tensorboard_log import TensorBoardLog, require_tensorboard


@dataclass
class TrainResult:
    step: int
    model_dir: Path
    train_losses: list[float] = field(default_factory=list)  # one per step run here
    evals: list[dict] = field(default_factory=list)


@dataclass
class Start:
    """Where a run starts: its settings (vocab_size filled in), tokenizer, model and step,
    and the metrics.jsonl lines up to that step."""
    cfg: HiMoEConfig
    tokenizer: object
    model: HiMoEModel
    step: int = 0
    metrics_lines: list[str] = field(default_factory=list)


def new_start(cfg: HiMoEConfig, corpus: Corpus | PreparedCorpus) -> Start:
    """A tokenizer trained on the corpus and a model initialised from the seed."""
    tokenizer = new_tokenizer(cfg, corpus)  # a prepared corpus brings its own
    cfg = dataclasses.replace(cfg, tokenizer=tokenizer.kind, vocab_size=tokenizer.vocab_size)
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    return Start(cfg, tokenizer, HiMoEModel(cfg.model))


def resumed_start(cfg: HiMoEConfig, corpus: Corpus | PreparedCorpus, model_dir: Path) -> Start:
    """The saved tokenizer and weights, with the settings of this run (its flags may change
    the routing losses, never the shapes)."""
    saved, vocab, step = checkpoint.read_config(model_dir)
    check_lr_scales(cfg, saved)  # before torch's own error about the optimiser groups
    tokenizer = tokenizer_for(saved, vocab, model_dir)
    missing = unknown_chars(corpus, tokenizer)
    if missing:
        raise UserError(f"corpus {corpus.source} has characters the saved model does not "
                        f"know: {''.join(missing)!r}; resume on the same corpus")
    cfg = dataclasses.replace(cfg, vocab_size=saved.vocab_size)
    model, _, _, _ = checkpoint.load_model(model_dir, config=cfg.model)
    return Start(cfg, tokenizer, model, step, checkpoint.read_metrics(model_dir, step))


def branched_start(cfg: HiMoEConfig, corpus: Corpus | PreparedCorpus, source: Path) -> Start:
    """--init_from: the weights and tokenizer saved in `source`, trained from step 0 on this
    run's corpus with a new optimiser and schedule. cfg must have the saved model's shape
    (cli.train.branch_config takes it); the vocabulary comes with the tokenizer."""
    saved, vocab, _ = checkpoint.read_config(source)
    tokenizer = tokenizer_for(saved, vocab, source)
    missing = unknown_chars(corpus, tokenizer)
    if missing:
        raise UserError(f"corpus {corpus.source} has characters the model in {source} does "
                        f"not know: {''.join(missing)!r}; start that model from a corpus that "
                        "has them, or use --tokenizer bpe, whose bytes cover any text")
    cfg = dataclasses.replace(cfg, tokenizer=saved.tokenizer, vocab_size=saved.vocab_size)
    model, _, _, _ = checkpoint.load_model(source, config=cfg.model)
    return Start(cfg, tokenizer, model)


@dataclass
class Window:
    """The steps since the last evaluation: their time, losses and auxiliary losses."""
    seconds: float = 0.0
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # of the steps not skipped
    aux: dict[str, float] = field(default_factory=dict)


class Trainer:
    @classmethod
    def new(cls, cfg: HiMoEConfig, **kwargs) -> Trainer:
        return cls(cfg, resume=False, **kwargs)

    @classmethod
    def resume(cls, cfg: HiMoEConfig, **kwargs) -> Trainer:
        return cls(cfg, resume=True, **kwargs)

    def __init__(self, cfg: HiMoEConfig, resume: bool = False, out=None,
                 skip_nonfinite: bool = False, train_only: str | None = None,
                 parallel: Parallel | None = None, force: bool = False,
                 init_from: Path | None = None):
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
        self.heap_watch = FreedMemoryWatch(active=keep_freed_memory())
        corpus = open_corpus(cfg.data_file)  # documents, or a prepared directory
        self.corpus_sha256 = corpus.sha256()
        checkpoint.check_model_dir_writable(self.model_dir)
        # force: a new model may replace the one in model_dir (never a folder of other files).
        self._lock = self._lock_model_dir(resume, force)
        try:
            if resume:
                start = resumed_start(cfg, corpus, self.model_dir)
            elif init_from is not None:  # a new run from a saved model's weights
                start = branched_start(cfg, corpus, init_from)
            else:
                start = new_start(cfg, corpus)
            self._prepare(start, corpus, resume, train_only)
        except BaseException:
            self._lock.release()
            raise

    def _lock_model_dir(self, resume: bool, force: bool) -> atomic_dir.WriterLock:
        """The writer lock, held (by the one rank that writes) until train() ends: a second
        writer stops at once."""
        if not resume:
            return checkpoint.new_model_dir_lock(self.model_dir, force,
                                                 acquire=self.parallel.is_main)
        checkpoint.read_config(self.model_dir)  # no model there: say so first
        safe_path.check_tree(self.model_dir)  # nothing planted that a save would write through
        lock = atomic_dir.WriterLock(self.model_dir)
        if self.parallel.is_main:
            lock.acquire()
        return lock

    def __del__(self):
        with contextlib.suppress(Exception):
            self._lock.release()

    def _prepare(self, start: Start, corpus: Corpus | PreparedCorpus, resume: bool,
                 train_only: str | None) -> None:
        """Everything both kinds of run share once the model exists: placement, data,
        optimizer, generators; a resumed run then restores its saved training state."""
        parallel, cfg = self.parallel, start.cfg
        self.cfg, self.tokenizer, self.model = cfg, start.tokenizer, start.model
        self.step, self.metrics_lines = start.step, start.metrics_lines  # metrics.jsonl
        parallel.check(cfg, train_only)
        total, active = self.model.parameter_counts()  # of the whole model, before sharding
        parallel.place(self.model, self.device)
        self.train_data, self.val_data = token_splits(corpus, self.tokenizer, cfg.block_size)
        if train_only is not None:
            self.freezer = Freezer(self.model, set(spec_files(train_only, cfg, "--train_only")))
            self._print(self.freezer.summary())
        if parallel.mode == "single" and self.freezer is None:
            write_expert_grads_in_place(self.model)  # nothing hooks the expert gradients
        # The compiled forward shares the model's parameters; evaluation and sampling use
        # the plain model, so switching to eval mode triggers no recompilation.
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
        # Repeated text is where a MoE over-fits before its dense-equivalent (docs/efficiency.md)
        step_tokens = cfg.batch_size * cfg.block_size
        self._print(f"steps: {cfg.max_iters:,} of {step_tokens:,} tokens, "
                    f"{cfg.max_iters * step_tokens / len(self.train_data):.1f} passes over the "
                    f"{len(self.train_data):,} training tokens")
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
                                  keep=self.freezer.frozen_files if self.freezer else (),
                                  config=self.cfg)
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
        model.train()
        self.tb = None
        if cfg.log == "tensorboard" and self.parallel.is_main:  # one writer under torchrun
            self.tb = TensorBoardLog(Path(cfg.log_dir) if cfg.log_dir else self.model_dir / "tb")
        bar = self.bar = tqdm(total=cfg.max_iters, initial=self.step, desc="train",
                              unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
                              disable=not self.parallel.is_main)
        window = Window()
        while self.step < cfg.max_iters:
            lr = set_scheduled_lr(self.optimizer, self.step, cfg)
            if cfg.intra_warmup:
                model.set_intra_scale(min(1.0, self.step / cfg.intra_warmup))
            t0 = time.perf_counter()
            try:
                x, y = get_batch(self.train_data, cfg.batch_size, cfg.block_size, self.data_gen)
            except UserError:  # a damaged prepared shard: its name, on a line of its own
                bar.close()
                raise
            # The forward may update router buffers (e.g. a logit EMA): a skipped step undoes it.
            buffers = [b.clone() for b in model.buffers()] if self.skip_nonfinite else None
            try:
                with autocast(self.device, self.dtype):
                    loss = train_step(model, self.optimizer, self.params, x.to(self.device),
                                      y.to(self.device), grad_clip=cfg.grad_clip,
                                      forward=self.forward, parallel=self.parallel,
                                      bias_rate_scale=bias_rate_at(self.step, cfg))
                loss_value = loss.item()
            except NonFiniteStep as bad:
                self._skip_or_stop(bad, bar, buffers)  # raises unless --skip_nonfinite
                loss_value = bad.loss
            else:
                for name, value in model.aux_losses().items():
                    window.aux[name] = window.aux.get(name, 0.0) + value
                window.losses.append(loss_value)
            if self.freezer is not None:  # AdamW may have moved frozen rows: put them back
                self.freezer.after_step()
            self.heap_watch.after_step()
            window.seconds += time.perf_counter() - t0
            self.step += 1
            window.steps += 1
            result.train_losses.append(loss_value)
            if self.tb is not None:
                self.tb.step(self.step, loss_value, lr)
            tok_s = window.steps * cfg.batch_size * cfg.block_size / max(window.seconds, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                            refresh=False)
            bar.update(1)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                result.evals.append(self._evaluate_and_save(window, lr, tok_s))
                window = Window()
            if stop_at is not None and self.step >= stop_at:
                break
        bar.close()
        if self.tb is not None:
            self.tb.close()
        result.step = self.step
        if self.step >= cfg.max_iters:
            self.finish(result.evals[-1])
        return result

    def _evaluate_and_save(self, window: Window, lr: float, tok_s: float) -> dict:
        """The validation figures with this window's training figures: printed, appended
        to metrics.jsonl, logged, then a save."""
        ev = evaluate(self.model, self.val_data, self.cfg, self.device, self.dtype)
        done = max(1, len(window.losses))  # steps of this window that were not skipped
        ev.update(step=self.step, lr=lr, tokens_per_s=tok_s,
                  train_loss=sum(window.losses) / len(window.losses) if window.losses
                  else float("nan"),
                  aux={k: v / done for k, v in window.aux.items()},
                  mfu=mfu(self.cfg, self.active_params, tok_s, self.peak_flops),
                  skipped_steps=self.skipped_steps)
        self.bar.write(f"step {self.step}: train loss {ev['train_loss']:.4f}, val loss "
                       f"{ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}), {tok_s:,.0f} tok/s",
                       file=self.out)
        for warning in flag_collapse(ev["layers"], self.model.cfg):
            self.bar.write(warning, file=self.out)
        self.metrics_lines.append(json.dumps(ev) + "\n")
        if self.tb is not None:
            self.tb.evaluation(ev)
        self.save()
        return ev

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
