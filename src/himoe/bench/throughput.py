"""`himoe bench`: speed and memory of himoe against its baselines (docs/studies.md, "Speed").

One process runs both sides of each comparison, alternating A B A B after a warm-up, and
reports the median ratio with its min and max: on a shared, noisy machine a ratio measured
side by side means far more than an absolute time. Only training steps are timed (forward,
backward, gradient clip, optimiser step, zero_grad), as in `Trainer.train`.

    himoe bench                          # or: python benchmarks/throughput.py
    himoe bench --smoke --out /tmp/b.md  # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from himoe.cli.presets import PRESETS
from himoe.config import HiMoEConfig
from himoe.data.batches import get_batch
from himoe.data.corpus_files import load_corpus
from himoe.data.tokenizers import CharTokenizer
from himoe.model import DenseFFN, HiMoEModel, MoELayer
from himoe.training.allocator import keep_freed_memory
from himoe.training.device import autocast
from himoe.training.flops import mfu, peak_flops
from himoe.training.optim import bias_rate_at, build_optimizer, set_scheduled_lr
from himoe.training.step import train_step, write_expert_grads_in_place

SECTIONS = ("train", "card", "grouped", "peer", "generate", "memory", "layer", "gpu")
SECTION_ALIASES = {"a": "card", "b": "grouped", "c": "generate", "d": "memory"}
# Hi-MoE's grouped routing: top-1 in each of the 6 groups, with the paper's regularisers.
GROUPED = dict(router="grouped", top_k_experts=1, switch_coef=0.01, z_coef=0.001,
               inter_coef=0.05, intra_coef=0.1)
# --smoke: sizes small enough to run every section in a few seconds.
SMOKE_SIZES = dict(n_embd=32, n_head=2, block_size=16, batch_size=4)
SMOKE_GEN_TOKENS = 24  # more than block_size, so the context-window restart runs too
CARD_GEN_TOKENS = 400  # the card's sample.txt
# The MoE layer alone against the dense FFN, forward and backward: tokens per call. On a GPU
# the sizes of docs/benchmarks.md in bf16; on a CPU one size in fp32, to keep the run short.
LAYER_TOKENS = {"cuda": (8192, 16384, 32768, 65536), "cpu": (8192,), "smoke": (64,)}
TARGETS = {"card": 0.85, "grouped": 0.23, "generate": 5.0, "memory_mb": 2000.0,
           "train": 0.85, "peer": 1.5}
# Whole `himoe train` processes: (short, long) --max_iters; the long run's extra steps are
# timed, so start-up, the final evaluation, the sample and the save cancel out.
PROCESS_STEPS = {"full": (5, 45), "smoke": (1, 3)}
# What each process row trains, against `--router dense` with the same other flags.
PROCESS_VARIANTS = {"the default model": [], "--preset himoe-card": ["--preset", "himoe-card"]}


@dataclass
class Settings:
    repeats: int
    steps: int
    warmup: int
    threads: int
    smoke: bool

    @property
    def sizes(self) -> dict:
        return SMOKE_SIZES if self.smoke else {}

    @property
    def gen_tokens(self) -> int:
        return SMOKE_GEN_TOKENS if self.smoke else CARD_GEN_TOKENS


@dataclass
class Row:
    """One line of the report's table; every cell is already formatted."""

    benchmark: str
    measured: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: str = "-"


# --- statistics and formatting ---
def ratio_cell(ratios: list[float], unit: str = "x") -> str:
    return (f"{statistics.median(ratios):.2f}{unit} "
            f"[{min(ratios):.2f}, {max(ratios):.2f}]")


def rate_cell(rates: list[float], what: str) -> str:
    return f"{statistics.median(rates):,.0f} {what}"


def yes_no(ok: bool) -> str:
    return "yes" if ok else "**no**"


# --- models and data ---
def hamlet() -> tuple[torch.Tensor, CharTokenizer]:
    """The shipped Hamlet text as token ids, and its character tokenizer."""
    text, _ = load_corpus(None)
    tok = CharTokenizer.from_text(text)
    return torch.tensor(tok.encode(text), dtype=torch.long), tok


def card_config(vocab_size: int, settings: Settings, **overrides) -> HiMoEConfig:
    """The card's model (dropout 0.1 included) with the card's own routing, not himoe's
    default, at the given router; raises if this himoe does not know an override yet."""
    return HiMoEConfig(vocab_size=vocab_size, **{**PRESETS["himoe-card"], "device": "cpu",
                                                  **settings.sizes, **overrides}).validate()


def build(cfg: HiMoEConfig, seed: int = 1337) -> HiMoEModel:
    torch.manual_seed(seed)  # both sides start from reproducible weights
    return HiMoEModel(cfg)


def experts_with_tokens(model: HiMoEModel) -> list[int]:
    """Per MoE layer, how many experts got at least one token in the last forward: the
    per-expert work of a step on a CPU grows with it."""
    return [int(m.last_ids_TK.unique().numel()) for m in model.moe_layers.values()]


def sample_batches(data: torch.Tensor, cfg: HiMoEConfig, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [get_batch(data, cfg.batch_size, cfg.block_size, gen) for _ in range(n)]


# --- training throughput ---
class TrainSide:
    """A model and its training optimiser; times whole training steps."""

    def __init__(self, model: HiMoEModel, cfg: HiMoEConfig, device: str = "cpu"):
        # cfg: what the model was built from; the training settings come from it.
        self.model = model.to(device).train()
        self.cfg = cfg
        self.device = torch.device(device)
        # As `himoe train` does: bf16 autocast on CUDA, fp32 on the CPU.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.optimizer = build_optimizer(model, cfg)
        self.params = list(model.parameters())
        write_expert_grads_in_place(model)  # as `himoe train` does in one process
        self.steps_done = 0

    def step(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> float:
        """Trainer.train's own step function (the batch is sampled beforehand, untimed), at
        the learning rate and selection-bias step of the schedule: with the peak rate from
        step 1 the card's routing collapsed within a few steps (1-7 experts with tokens per
        layer, against 8-30 in `himoe train`'s warm-up), which made the card look faster
        than a user's run.
        .item() waits for the device, so a GPU step is timed whole."""
        set_scheduled_lr(self.optimizer, self.steps_done, self.cfg)
        bias_rate_scale = bias_rate_at(self.steps_done, self.cfg)
        self.steps_done += 1
        with autocast(self.device, self.dtype):
            return train_step(self.model, self.optimizer, self.params, x_BT.to(self.device),
                              y_BT.to(self.device), grad_clip=self.cfg.grad_clip,
                              bias_rate_scale=bias_rate_scale).item()

    def tokens_per_s(self, batches) -> float:
        return tokens_per_s(self, batches)


def tokens_per_s(side, batches) -> float:
    """Training tokens/s of `side` (anything with .step(x, y) and .cfg) over the batches."""
    t0 = time.perf_counter()
    for x_BT, y_BT in batches:
        side.step(x_BT, y_BT)
    seconds = time.perf_counter() - t0
    return len(batches) * side.cfg.batch_size * side.cfg.block_size / seconds


def alternate(side_a: Callable[[int], float], side_b: Callable[[int], float],
              repeats: int) -> tuple[list[float], list[float]]:
    """A B A B: each side's rate per repeat; repeat r hands both sides the same input r."""
    rates_a, rates_b = [], []
    for r in range(repeats):
        rates_a.append(side_a(r))
        rates_b.append(side_b(r))
    return rates_a, rates_b


def compare_training(variant: HiMoEConfig, dense: HiMoEConfig, data: torch.Tensor,
                     settings: Settings, device: str = "cpu") -> tuple[list[float], list[float]]:
    """Tokens/s of each side per repeat, after `warmup` untimed steps each."""
    return compare_sides(TrainSide(build(variant), variant, device),
                         TrainSide(build(dense), dense, device), data, settings)


def compare_sides(a, b, data: torch.Tensor, settings: Settings):
    """Tokens/s of two training sides per repeat, A B A B on the same batches, after
    `warmup` untimed steps each."""
    warm = sample_batches(data, a.cfg, settings.warmup, seed=0)
    for side in (a, b):
        tokens_per_s(side, warm)
    timed = [sample_batches(data, a.cfg, settings.steps, seed=1 + r)
             for r in range(settings.repeats)]
    return alternate(lambda r: tokens_per_s(a, timed[r]), lambda r: tokens_per_s(b, timed[r]),
                     settings.repeats)


def bench_peer(data, vocab_size, settings: Settings) -> Row:
    """himoe's default model against transformers' Qwen2-MoE (experts on grouped_mm) at the
    same parameters and active FFN FLOPs (himoe.bench.peer), one training step each."""
    name = "training step: the default model vs transformers Qwen2-MoE (grouped_mm)"
    cfg = HiMoEConfig(vocab_size=vocab_size, device="cpu", **settings.sizes).validate()
    try:
        import transformers

        from himoe.bench.peer import QwenMoeSide
        peer = QwenMoeSide(cfg)
    except ImportError:
        return Row(name, "not run: needs transformers (pip install 'himoe[hf]')")
    ours = TrainSide(build(cfg), cfg)
    rates_o, rates_p = compare_sides(ours, peer, data, settings)
    return training_row(f"{name}, transformers {transformers.__version__}, "
                        f"{peer.parameter_count() / 1e6:.1f}M vs "
                        f"{sum(p.numel() for p in ours.params) / 1e6:.1f}M parameters",
                        "peer", rates_o, rates_p, versus="Qwen2-MoE")


def training_row(name: str, target_key: str, rates_v: list[float],
                 rates_d: list[float], versus: str = "dense") -> Row:
    ratios = [v / d for v, d in zip(rates_v, rates_d)]
    target = TARGETS[target_key]
    return Row(name, rate_cell(rates_v, "tok/s"), rate_cell(rates_d, "tok/s"),
               ratio_cell(ratios), f">= {target:.2f}x {versus}",
               yes_no(statistics.median(ratios) >= target))


def bench_card(data, vocab_size, settings: Settings) -> Row:
    card = card_config(vocab_size, settings)
    dense = card_config(vocab_size, settings, router="dense")
    rates_v, rates_d = compare_training(card, dense, data, settings)
    return training_row("card training in one process: hierarchical 6x8, top-1 vs "
                        "dense-equivalent", "card",
                        rates_v, rates_d)


def bench_grouped(data, vocab_size, settings: Settings) -> Row:
    name = "grouped 6 x top-1 + Hi-MoE terms vs dense-equivalent"
    grouped = card_config(vocab_size, settings, **GROUPED)
    dense = card_config(vocab_size, settings, router="dense")
    rates_v, rates_d = compare_training(grouped, dense, data, settings)
    return training_row(name, "grouped", rates_v, rates_d)


def bench_gpu(data, vocab_size, settings: Settings) -> Row:
    """The card's training on a GPU in bf16 against its dense-equivalent, when one is here."""
    name = "card training on a GPU (bf16) vs dense-equivalent"
    if not torch.cuda.is_available():
        return Row(name, "not run: no CUDA device on this machine")
    card = card_config(vocab_size, settings, device="cuda")
    dense = card_config(vocab_size, settings, device="cuda", router="dense")
    rates_v, rates_d = compare_training(card, dense, data, settings, device="cuda")
    ratios = [v / d for v, d in zip(rates_v, rates_d)]
    # MFU on active parameters, as `himoe train` logs it; the peak is the GPU's bf16 one.
    peak = peak_flops(torch.device("cuda"))
    active = build(card).parameter_counts()[1]
    util = mfu(card, active, statistics.median(rates_v), peak)
    mfu_text = f", MFU {util:.1%}" if util is not None else ", MFU: unknown GPU peak"
    return Row(f"{name} ({torch.cuda.get_device_name()})",
               rate_cell(rates_v, "tok/s") + mfu_text, rate_cell(rates_d, "tok/s"),
               ratio_cell(ratios))


# --- whole training processes, as a user runs them ---
def himoe_train_seconds(flags: list[str], steps: int) -> float:
    """Wall-clock seconds of one `himoe train --max_iters steps` process with these flags
    (one evaluation, at the end), in a model folder that goes away after."""
    with tempfile.TemporaryDirectory(prefix="himoe-bench-") as tmp:
        cmd = [sys.executable, "-m", "himoe", "train", "--max_iters", str(steps),
               "--eval_interval", str(steps), "--eval_iters", "1", "--sample_tokens", "1",
               "--device", "cpu", "--model_dir", str(Path(tmp) / "m"), *flags]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0


def train_process_seconds(flags: list[str], steps: int, settings: Settings) -> float:
    """Wall-clock seconds of one such process on Hamlet at the bench's sizes."""
    return himoe_train_seconds([f"--{k}={v}" for k, v in settings.sizes.items()] + flags, steps)


def bench_train_processes(settings: Settings) -> list[Row]:
    """Tokens/s of whole `himoe train` processes, each side's (long - short) run, alternating
    variant and dense; the torch threads are the process's own default, as for a user."""
    short, long = PROCESS_STEPS["smoke" if settings.smoke else "full"]
    cfg = HiMoEConfig(**settings.sizes)
    tokens = (long - short) * cfg.batch_size * cfg.block_size

    def side(flags: list[str]) -> Callable[[int], float]:
        def run(_: int) -> float:
            seconds = (train_process_seconds(flags, long, settings)
                       - train_process_seconds(flags, short, settings))
            return tokens / max(seconds, 1e-9)
        return run

    rows = []
    for name, flags in PROCESS_VARIANTS.items():
        rates_v, rates_d = alternate(side(flags), side(flags + ["--router", "dense"]),
                                     1 if settings.smoke else settings.repeats)
        rows.append(training_row(f"`himoe train` processes: {name} vs `--router dense` "
                                 f"(steps {short + 1}-{long})", "train", rates_v, rates_d))
    return rows


# --- one MoE layer against one dense FFN ---
def bench_layer(settings: Settings) -> list[Row]:
    """Forward and backward of the card's MoE layer (fresh routers, so tokens spread over
    the experts) against the dense-equivalent FFN, at LAYER_TOKENS tokens per call."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = card_config(256, settings, device=device)
    torch.manual_seed(0)
    modules = {"moe": MoELayer(cfg).to(device), "dense": DenseFFN(
        cfg.n_embd, cfg.ffn_hidden, cfg.n_layer).to(device)}
    return [layer_row(modules, n, cfg.block_size, cfg.n_embd, device, dtype, settings)
            for n in LAYER_TOKENS["smoke" if settings.smoke else device]]


def layer_row(modules: dict, n: int, block_size: int, n_embd: int, device: str,
              dtype: torch.dtype, settings: Settings) -> Row:
    x_BTD = torch.randn(n // block_size, block_size, n_embd, device=device, requires_grad=True)
    grad_BTD = torch.randn_like(x_BTD)

    def side(module: torch.nn.Module) -> Callable[[int], float]:
        def run(_: int) -> float:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(settings.steps):
                with torch.autocast(device, dtype, enabled=dtype != torch.float32):
                    y_BTD = module(x_BTD)
                y_BTD.backward(grad_BTD.to(y_BTD.dtype))
                module.zero_grad(set_to_none=True)
                x_BTD.grad = None
            sync(device)
            return settings.steps * n / (time.perf_counter() - t0)
        return run

    for module in modules.values():  # warm-up, untimed
        side(module)(0)
    rates_m, rates_d = alternate(side(modules["moe"]), side(modules["dense"]), settings.repeats)
    ratios = [m / d for m, d in zip(rates_m, rates_d)]
    return Row(f"MoE layer forward+backward, {n:,} tokens, {device} "
               f"{str(dtype).removeprefix('torch.')} vs dense-equivalent FFN",
               rate_cell(rates_m, "tok/s"), rate_cell(rates_d, "tok/s"), ratio_cell(ratios))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- generation ---
def generate_once(model: HiMoEModel, context_BT: torch.Tensor, n_tokens: int,
                  use_cache: bool) -> tuple[float, torch.Tensor]:
    gen = torch.Generator().manual_seed(1337)  # the same seed for both sides
    t0 = time.perf_counter()
    out_BL = model.generate(context_BT, n_tokens, use_cache=use_cache, generator=gen)
    return time.perf_counter() - t0, out_BL


def bench_generate(tok: CharTokenizer, settings: Settings) -> Row:
    model = build(card_config(tok.vocab_size, settings)).eval()
    context_BT = torch.tensor([[tok.blank_token()]])  # the card's blank context
    n = settings.gen_tokens
    for use_cache in (True, False):  # warm-up: short runs, untimed
        generate_once(model, context_BT, min(n, 32), use_cache)
    outputs = {True: [], False: []}

    def side(use_cache: bool) -> Callable[[int], float]:
        def run(_: int) -> float:
            seconds, out_BL = generate_once(model, context_BT, n, use_cache)
            outputs[use_cache].append(out_BL)
            return n / seconds
        return run

    rates_c, rates_r = alternate(side(True), side(False), settings.repeats)
    same = all(torch.equal(c, r) for c, r in zip(outputs[True], outputs[False]))
    ratios = [c / r for c, r in zip(rates_c, rates_r)]
    ok = statistics.median(ratios) >= TARGETS["generate"] and same
    return Row(f"generation of {n} tokens: KV cache vs recompute "
               f"({'same' if same else '**different**'} tokens)",
               rate_cell(rates_c, "tok/s"), rate_cell(rates_r, "tok/s"), ratio_cell(ratios),
               f">= {TARGETS['generate']:.0f}x, same tokens", yes_no(ok))


# --- peak memory (in a fresh process, so nothing else run here counts) ---
def memory_child(settings: Settings) -> None:
    """Card training steps, then print peak RSS in MB as one JSON line."""
    data, tok = hamlet()
    cfg = card_config(tok.vocab_size, settings)
    side = TrainSide(build(cfg), cfg)
    built_mb = peak_rss_mb()
    side.tokens_per_s(sample_batches(data, side.cfg, settings.warmup + settings.steps, seed=0))
    print(json.dumps({"built_mb": built_mb, "peak_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries
    that across exec, so a child would report its parent's peak at fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def bench_memory(settings: Settings) -> Row:
    cmd = [sys.executable, "-m", "himoe.bench.throughput", "--memory-child",
           "--threads", str(settings.threads), "--steps", str(settings.steps),
           "--warmup", str(settings.warmup)] + (["--smoke"] if settings.smoke else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"memory subprocess failed (exit {r.returncode}):\n{r.stderr}")
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    peak = figures["peak_mb"]
    return Row(f"peak memory (RSS) of card training, {settings.warmup + settings.steps} steps",
               f"{peak:,.0f} MB", f"{figures['built_mb']:,.0f} MB after building",
               target=f"< {TARGETS['memory_mb'] / 1000:.0f} GB",
               met=yes_no(peak < TARGETS["memory_mb"]))


# --- the report ---
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[Row]) -> str:
    header = ["benchmark", "measured (median)", "baseline (median)",
              "ratio median [min, max]", "target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(dataclasses.astuple(row)) + " |")
    return "\n".join(lines)


# The report goes between these two lines, and a run replaces only what is between them:
# notes written around an earlier report, or a file that never held one, are kept.
REPORT_BEGIN = "<!-- himoe bench report: begin -->"
REPORT_END = "<!-- himoe bench report: end -->"


def with_report(old: str | None, report_text: str) -> str:
    """The file's text `old` (None: no file yet) with its report block replaced by
    report_text; a text without a block gets one at its end."""
    block = f"{REPORT_BEGIN}\n{report_text}{REPORT_END}\n"
    if old is None:
        return block
    start, end = old.find(REPORT_BEGIN), old.find(REPORT_END)
    if 0 <= start < end:
        return old[:start] + block + old[end + len(REPORT_END):].removeprefix("\n")
    return old + ("\n" if old.endswith("\n") else "\n\n") + block


def report(rows: list[Row], settings: Settings, command: str) -> str:
    shape = "tiny (--smoke) sizes" if settings.smoke else "the card's sizes"
    cfg = HiMoEConfig(**settings.sizes)
    batch = f"{cfg.batch_size} x {cfg.block_size} tokens"
    return "\n".join([
        "## Latest `himoe bench` run", "",
        f"Measured side by side in one process, {shape}, fp32 on the CPU: "
        f"{settings.repeats} timed repeats per side, alternating A B A B, after a warm-up "
        f"({settings.warmup} untimed training steps per side); a training repeat times "
        f"{settings.steps} steps of batch {batch}. Ratios are measured / baseline, per "
        "repeat. Protocol and targets: docs/studies.md, \"Speed\".", "",
        table(rows), "",
        f"- machine: {cpu_model()}, {settings.threads} torch threads "
        f"({os.cpu_count()} CPUs visible)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`", ""])


def write_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- command line ---
def default_out() -> Path:
    """The report's place: docs/benchmarks.md of the source checkout himoe runs from (an
    editable install); an installed package has no docs/, so the current directory."""
    root = Path(__file__).resolve().parents[3]  # src/himoe/bench/throughput.py -> root
    if (root / "pyproject.toml").is_file() and (root / "docs").is_dir():
        return root / "docs" / "benchmarks.md"
    return Path("benchmarks.md")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as the himoe command line does
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {text!r}")
    return value


def sections(text: str) -> list[str]:
    names = [SECTION_ALIASES.get(s.strip(), s.strip()) for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of "
                                         f"{', '.join(SECTIONS)} (or a, b, c, d)")
    return names


def build_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Training and generation speed, and peak memory, "
                                      "against their baselines (docs/studies.md, \"Speed\").")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per side")
    p.add_argument("--steps", type=positive_int, default=3,
                   help="timed training steps per repeat")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed warm-up steps")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads (default: 2, or 1 with --smoke)")
    p.add_argument("--out", type=Path, default=default_out(),
                   help="the Markdown file whose report block this run replaces, keeping "
                        "the rest (default: docs/benchmarks.md when himoe runs from a source "
                        "checkout, else benchmarks.md in the current directory)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, 2 repeats of 1 step: checks that it runs, in seconds")
    p.add_argument("--only", type=sections, default=list(SECTIONS),
                   help=f"comma list of sections to run: {','.join(SECTIONS)} (default: all)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    if args.smoke:
        # One thread: on a busy machine, tiny ops on 2 threads spend most time spin-waiting.
        threads = args.threads or 1
        return Settings(min(args.repeats, 2), 1, 1, threads, smoke=True)
    return Settings(args.repeats, args.steps, args.warmup, args.threads or 2, smoke=False)


def run_sections(names: list[str], settings: Settings) -> list[Row]:
    data, tok = hamlet()
    runners = {"train": lambda: bench_train_processes(settings),
               "card": lambda: bench_card(data, tok.vocab_size, settings),
               "grouped": lambda: bench_grouped(data, tok.vocab_size, settings),
               "peer": lambda: bench_peer(data, tok.vocab_size, settings),
               "generate": lambda: bench_generate(tok, settings),
               "memory": lambda: bench_memory(settings),
               "layer": lambda: bench_layer(settings),
               "gpu": lambda: bench_gpu(data, tok.vocab_size, settings)}
    rows = []
    for name in SECTIONS:
        if name in names:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            got = runners[name]()
            rows.extend(got if isinstance(got, list) else [got])
            gc.collect()  # free one section's models before the next is built
            # Shown as each section ends, so a run cut short still tells what it measured.
            print(f"bench: {name} took {time.perf_counter() - t0:.0f} s: "
                  f"{rows[-1].measured} vs {rows[-1].baseline}, {rows[-1].ratio}",
                  file=sys.stderr, flush=True)
    if settings.smoke:  # tiny sizes say nothing about the card's targets
        rows = [dataclasses.replace(row, met="n/a (smoke)") for row in rows]
    return rows


def main(argv: list[str] | None = None, prog: str = "python benchmarks/throughput.py") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    settings = settings_from(args)
    torch.set_num_threads(settings.threads)
    keep_freed_memory()  # as `himoe train` does; process-wide, so both sides get it
    if args.memory_child:
        memory_child(settings)
        return 0
    rows = run_sections(args.only, settings)
    old = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
    write_atomic(with_report(old, report(rows, settings, shlex.join([*shlex.split(prog), *argv]))),
                 args.out)
    print(table(rows))
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
