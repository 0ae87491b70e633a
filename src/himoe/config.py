"""The settings of a model and of a `himoe train` run, split by what they are.

ModelConfig: what builds the model and its forward pass (shape, routing, the routing losses
the forward computes, dropout) and the tokenizer its vocabulary came from. HiMoEModel,
the routers and the MoE layer receive only this.
TrainConfig: what the trainer reads (batch, schedule, AdamW, clipping, evaluation, seed).
RunConfig: where and how this process runs (device, paths, logging, the final sample).
HiMoEConfig: all three, flat, as the card's table lists them: what the CLI fills and what
config.json records (so existing tools keep reading the same keys), with .model, .train
and .run views.

Help text lives beside each field (metadata "help"); `himoe train` builds its flags from
it. The defaults are the card's, but for its routing: the card's literal routing (no
balancing, one full-width routed expert) collapses onto one expert, so the default takes
two narrower experts of the chosen group beside a shared expert of half the active width,
with the two-level Switch loss and the loss-free bias (docs/routing_study.md,
docs/efficiency.md);
`--preset himoe-card` restores the card's routing exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from himoe.errors import UserError
from himoe.model.routers.registry import ROUTER_OPTIONS, router_names, router_spec

REG_FORMS = ("l2", "entropy")
DEVICES = ("auto", "cpu", "cuda")
BIAS_RATE_SCHEDULES = ("constant", "lr")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZERS = ("char", "bpe")
LOGGERS = ("none", "tensorboard")


def setting(default, help: str, **meta):
    """A config field with its flag's help text. meta: choices (allowed values), shape
    (fixes the weights' shapes: taken from config.json on resume, no flag may change it),
    flag (the flag's name where it differs from the field's), no_flag (set by himoe)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


class _Section:
    @classmethod
    def of(cls, source):
        """This section's fields copied out of `source` (a HiMoEConfig, or a section)."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})


@dataclass
class ModelConfig(_Section):
    # --- model shape (the card's table) ---
    n_embd: int = setting(256, "embedding / hidden dimension", shape=True)
    n_layer: int = setting(2, "number of Transformer layers", shape=True)
    n_head: int = setting(4, "attention heads", shape=True)
    block_size: int = setting(128, "context window (tokens)", shape=True)
    num_moes: int = setting(6, "level-1 choices (MoE blocks, \"groups\")", shape=True)
    num_experts: int = setting(8, "level-2 choices per MoE block", shape=True)
    dropout: float = setting(0.0, "dropout rate (the card's is 0.1: --preset himoe-card)")
    # --- model shape (ours) ---
    top_k_groups: int = setting(1, "MoE blocks chosen per token (level 1)", shape=True)
    top_k_experts: int = setting(2, "experts chosen per chosen block (level 2)", shape=True)
    ffn_mult: int = setting(4, "expert hidden width as a multiple of n_embd", shape=True)
    router: str = setting("hierarchical", "a himoe.model.routers.registry name; dense: one "
                          "plain FFN", shape=True)
    capacity_factor: float = setting(0.0, "0 = dropless; else an expert keeps its cf*T*k/E "
                                     "highest-weight tokens")
    # --- routing losses and the grouped router (all but Switch off by default). They are
    # here, not in TrainConfig, because the forward pass computes the losses. ---
    switch_coef: float = setting(0.01, "Switch load-balancing loss coefficient (per level "
                                 "for the hierarchical router)")
    z_coef: float = setting(0.0, "router z-loss coefficient")
    seq_switch_coef: float = setting(0.0, "hierarchical router: Switch loss within each "
                                     "sequence, over all experts (DeepSeek-V3's sequence-wise "
                                     "balance loss)")
    router_jitter: float = setting(0.0, "hierarchical router: in training, scale the router's "
                                   "input by uniform noise in [1-eps, 1+eps] (Switch: 0.01)")
    # Shazeer et al. 2017's noisy top-k gating and its two balance losses, as router options.
    noisy_gating: float = setting(0.0, "hierarchical router: in training, add Gaussian noise "
                                  "of this std to both levels' logits before each top-k "
                                  "choice (noisy top-k gating; combine weights stay clean)")
    importance_coef: float = setting(0.0, "hierarchical router: CV^2 of each expert's summed "
                                     "combine weight (Shazeer et al.'s importance loss)")
    load_coef: float = setting(0.0, "hierarchical router: CV^2 of each expert's smooth load "
                               "estimate (Shazeer et al.'s load loss; needs --noisy_gating)")
    zero_router_init: bool = setting(False, "hierarchical router: both levels' gate matrices "
                                     "start at zero (Shazeer et al.); --noisy_gating breaks "
                                     "the ties")
    inter_coef: float = setting(0.0, "Hi-MoE inter-group balancing R_inter (lambda2; paper: "
                                "0.05)")
    intra_coef: float = setting(0.0, "Hi-MoE intra-group specialisation R_intra (lambda1; "
                                "paper: 0.1)")
    reg_form: str = setting("l2", "l2 or entropy form of the Hi-MoE terms", choices=REG_FORMS)
    intra_conditional: bool = setting(False, "true: R_intra on within-group probabilities")
    bias_tau: float = setting(0.01, "grouped router: tau of the logit-EMA correction")
    ema_beta: float = setting(0.9, "grouped router: EMA decay")
    router_temp: float = setting(1.0, "grouped router: softmax temperature")
    renormalize: bool = setting(False, "topk / group_limited: renormalise the kept weights "
                                "to sum to 1 (MiniMoE)")
    bias_update_rate: float = setting(1e-3, "loss-free balancing: selection-bias step per "
                                      "optimiser step (DeepSeek-V3: 1e-3; 0 = off)")
    shared_fraction: float = setting(0.5, "share of the active FFN width (ffn_mult * n_embd) "
                                     "given to a shared expert that every token runs beside "
                                     "its routed ones (0: none)", shape=True)
    expert_hidden: int = setting(0, "routed expert width (0: what the shared expert leaves "
                                 "of ffn_mult * n_embd, split over the experts a token runs)",
                                 shape=True)
    # Per layer, the expert count of every group once `himoe experts add` made them differ;
    # None: every group has num_experts. num_experts is then the largest group.
    group_experts: list[list[int]] | None = setting(None, "", shape=True, no_flag=True)
    # The share of the tokens level-1 balancing aims each group at (the Switch term's and the
    # selection bias's target); None: equal shares. `himoe merge` sets each branch's share
    # of the corpora, so that balancing keeps domains of unequal size in their own groups.
    group_shares: list[float] | None = setting(None, "", no_flag=True)
    # Per layer and group, where `himoe experts prune` moved each expert: position i holds
    # the index (1-based) now held by the expert that had index i + 1 before the first
    # prune, 0 where it was removed. None: never pruned.
    expert_index_map: list[list[list[int]]] | None = setting(None, "", no_flag=True)
    preset: str = setting("", "routing and losses of a source design (docs/routing.md: Presets); "
                          "flags override it")
    # The tokenizer belongs to the model: its vocabulary is the embedding's rows.
    vocab_size: int = setting(0, "", shape=True, no_flag=True)  # what the tokenizer has
    tokenizer: str = setting("char", "char (one token per character, the card's) or bpe "
                             "(byte-level BPE trained on the corpus, saved as tokenizer.json)",
                             shape=True, choices=TOKENIZERS)
    bpe_vocab_size: int = setting(2048, "--tokenizer bpe: target vocabulary size (the model "
                                  "gets the size the trained tokenizer has)", shape=True,
                                  flag="vocab_size")

    @property
    def shared_hidden(self) -> int:
        """Width of the shared expert (0: none)."""
        if router_spec(self.router).dense:  # the dense-equivalent: one FFN of the whole width
            return 0
        return round(self.shared_fraction * self.ffn_mult * self.n_embd)

    @property
    def routed_width(self) -> int:
        """What the shared expert leaves of a token's active FFN width, ffn_mult * n_embd."""
        return self.ffn_mult * self.n_embd - self.shared_hidden

    @property
    def ffn_hidden(self) -> int:
        """Width of each routed expert (of the one FFN, for the dense baseline). Unless set,
        a token's experts and the shared expert together are the card's one expert wide
        (ffn_mult * n_embd), each routed expert rounded to a multiple of 8 for aligned
        matmuls: routing schemes then compare at equal active parameters."""
        if self.expert_hidden:
            return self.expert_hidden
        k = self.experts_per_token
        return self.routed_width if k == 1 else max(8, round(self.routed_width / k / 8) * 8)

    @property
    def total_experts(self) -> int:
        return self.num_moes * self.num_experts

    def group_sizes(self, layer: int) -> list[int]:
        """How many experts each group of MoE layer `layer` (0-based) has."""
        if self.group_experts is None:
            return [self.num_experts] * self.num_moes
        return list(self.group_experts[layer])

    def real_slots(self, layer: int) -> list[int]:
        """The flat slots g * num_experts + j that hold an expert. In memory every group has
        num_experts slots, so ragged groups leave empty slots that routing never picks."""
        M = self.num_experts
        return [g * M + j for g, n in enumerate(self.group_sizes(layer)) for j in range(n)]

    @property
    def experts_per_token(self) -> int:
        return router_spec(self.router).experts_per_token(self)

    def parameter_estimate(self) -> int:
        """Parameters of the model this configuration builds (every group full, embeddings
        counted once as the LM head is tied), from the sizes alone: nothing is allocated."""
        D, F, E = self.n_embd, self.ffn_hidden, self.total_experts
        attention = 4 * D * D + 4 * D + 4 * D  # qkv and proj with biases, two LayerNorms
        spec = router_spec(self.router)
        if spec.dense:
            ffn = 2 * D * F + F + D
        else:
            ffn = E * (2 * D * F + F + D) + spec.gate_params(self)
            if self.shared_hidden:
                ffn += 2 * D * self.shared_hidden + self.shared_hidden + D
        return (self.vocab_size + self.block_size) * D + 2 * D + self.n_layer * (attention + ffn)



@dataclass
class TrainConfig(_Section):
    # --- the card's table ---
    batch_size: int = setting(32, "training batch size")
    max_iters: int = setting(3000, "training steps")
    # The card's 3e-4 (kept by --preset himoe-card) leaves both the MoE and dense far from
    # what they reach: 1,000-step runs on the 40 plays end 0.4 nats lower at 2e-3, the best
    # of 1e-3, 2e-3 and 4e-3 for dense (docs/efficiency.md, "The learning rate").
    lr: float = setting(2e-3, "peak learning rate")
    # --- the card's "Training Details" ---
    warmup_iters: int = setting(100, "linear warm-up steps")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices")
    grad_clip: float = setting(1.0, "gradient-norm clip")
    eval_interval: int = setting(500, "evaluate and save every this many steps")
    eval_iters: int = setting(20, "validation batches per evaluation")
    # The trainer sets the model's R_intra scale from this (stage 2 of the paper); the
    # model itself never reads it.
    intra_warmup: int = setting(0, "steps over which R_intra ramps in from 0")
    # Likewise the step of the routers' loss-free selection bias (bias_update_rate).
    bias_rate_schedule: str = setting("lr", "lr: the loss-free bias step follows the "
                                      "learning rate's warm-up and cosine decay; constant: "
                                      "bias_update_rate at every step",
                                      choices=BIAS_RATE_SCHEDULES)
    # Kept in their own AdamW parameter groups only when not 1, so an optimiser state saved
    # before the option existed (two groups) still loads; hence no move to or from 1 on
    # resume (cli.train refuses it).
    router_lr_scale: float = setting(1.0, "the routers' learning rate as a multiple of --lr, "
                                     "through the same warm-up and decay")
    # Each routed expert learns from a fraction of the tokens, so it may want its own rate.
    expert_lr_scale: float = setting(1.0, "the routed experts' learning rate as a multiple "
                                     "of --lr (shared experts excluded), through the same "
                                     "warm-up and decay")
    # The initial weights, the batch order and dropout: kept on resume like the rest.
    seed: int = setting(1337, "random seed")
    # What the model was trained on: recorded, so `himoe experts` and `himoe analyze` find it.
    data_file: str | None = setting(None, "training corpus: a UTF-8 text file, a directory "
                                    "or a glob of them, or a directory `himoe prepare` wrote "
                                    "(its tokenizer is used) (default: the shipped hamlet.txt)")


@dataclass
class RunConfig(_Section):
    device: str = setting("auto", "auto, cpu or cuda", choices=DEVICES)
    dtype: str = setting("auto", "compute dtype (auto: bfloat16 on CUDA, else float32)",
                         choices=DTYPES)
    model_dir: str = setting("model", "where the modular checkpoint goes")
    sample_tokens: int = setting(400, "length of sample.txt")
    compile: bool = setting(False, "true: torch.compile the training forward (attention, "
                            "norms, residuals; slow start, faster steps)")
    log: str = setting("none", "tensorboard: write TensorBoard scalars to log_dir (needs "
                       "pip install 'himoe[tensorboard]')", choices=LOGGERS)
    log_dir: str | None = setting(None, "TensorBoard directory (default: MODEL_DIR/tb)")


@dataclass
class HiMoEConfig(RunConfig, TrainConfig, ModelConfig):
    """Every setting of a run, flat: the model's, then training's, then the run's. config.json
    records the first two (to_dict); the run's (device, paths, logging) belong to one
    invocation and are never saved, so a resume takes them from its own flags."""

    @property
    def model(self) -> ModelConfig:
        return ModelConfig.of(self)

    @property
    def train(self) -> TrainConfig:
        return TrainConfig.of(self)

    @property
    def run(self) -> RunConfig:
        return RunConfig.of(self)

    def validate(self, origin: str | Path | None = None) -> HiMoEConfig:
        """Every value against its declared type and its range. origin: the config.json the
        values were read from, named in the error with the fix for a file; None: they came
        from flags, named --flag."""
        flag = (lambda name: f"--{FLAG_NAMES.get(name, name)}") if origin is None else str
        problem = _first_problem(self, flag)
        if problem is not None:
            text, fix = problem
            if origin is not None:
                raise UserError(f"{origin}: {text}; correct the value or restore the file "
                                "from a backup (a config.json himoe wrote passes this check)")
            raise UserError(f"{text}; {fix}")
        return self

    # --- JSON round trip ---
    def to_dict(self) -> dict:
        """The model's and training's settings: what config.json records."""
        run = {f.name for f in dataclasses.fields(RunConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in run}

    @classmethod
    def from_dict(cls, data: dict) -> HiMoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"config.json has unknown keys {unknown}; it was written by a "
                            "newer himoe, upgrade the package")
        # Written before shared experts existed: such a model has none; before the bias
        # schedule existed: a constant bias step, which a resumed run must keep.
        return cls(**{"shared_fraction": 0.0, "bias_rate_schedule": "constant", **data})

    def read_as_format(self, file_format) -> HiMoEConfig:
        """This config, read from a config.json of that himoe_format, in today's meaning.
        Format 1's expert_hidden 0 gave every routed expert all that the shared expert
        leaves, however many experts a token runs. Only on a validated config: it looks up
        the router."""
        if file_format == 1 and not self.expert_hidden and self.experts_per_token > 1:
            return dataclasses.replace(self, expert_hidden=self.routed_width)
        return self

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# Upper bounds far beyond any real run (the largest public models use n_embd ~2^14, 256
# experts, vocabularies ~2^18) that stop an absurd value before anything is allocated.
# n_head and the top-k counts are bounded by these through the checks that follow.
LIMITS = {"n_embd": 1 << 16, "n_layer": 1024, "block_size": 1 << 20, "num_moes": 4096,
          "num_experts": 4096, "ffn_mult": 1024, "expert_hidden": 1 << 20,
          "vocab_size": 1 << 24, "bpe_vocab_size": 1 << 22, "batch_size": 1 << 20}
STEP_LIMIT = 10**12  # max_iters and the other step counts
MAX_NEW_TOKENS = 10**7  # sample_tokens here, generate --max_new_tokens
SEED_MAX = 2**63 - 1  # torch takes up to 2^64 - 1; training also seeds with seed + 1
POSITIVE = ("n_embd", "n_layer", "n_head", "block_size", "num_moes", "num_experts",
            "top_k_groups", "top_k_experts", "ffn_mult", "batch_size", "max_iters",
            "eval_interval", "eval_iters")
NON_NEGATIVE = ("expert_hidden", "warmup_iters", "intra_warmup", "sample_tokens", "seed",
                "vocab_size")
UPPER = LIMITS | {name: STEP_LIMIT for name in ("max_iters", "eval_interval", "eval_iters",
                                                "warmup_iters", "intra_warmup")} | {
    "sample_tokens": MAX_NEW_TOKENS, "seed": SEED_MAX,
    # Above the expert count a capacity factor already keeps every token; an EMA decay > 1
    # grows instead of averaging.
    "capacity_factor": 10**6, "ema_beta": 1}
RATES = ("lr", "dropout", "weight_decay", "grad_clip", "min_lr_ratio", "capacity_factor",
         "switch_coef", "z_coef", "inter_coef", "intra_coef", "bias_tau", "ema_beta",
         "router_temp", "bias_update_rate", "seq_switch_coef", "router_jitter", "noisy_gating",
         "importance_coef", "load_coef", "router_lr_scale", "expert_lr_scale")
_FIELDS = dataclasses.fields(HiMoEConfig)
FLAG_NAMES = {f.name: f.metadata["flag"] for f in _FIELDS if "flag" in f.metadata}
CHOICES = {f.name: f.metadata["choices"] for f in _FIELDS if "choices" in f.metadata}
# Fixed by the saved weights: taken from config.json on resume, never from a flag.
SHAPE_FIELDS = tuple(f.name for f in _FIELDS if f.metadata.get("shape"))


def _type_problem(value, hint) -> str | None:
    """What `value` should have been, or None when it has the declared type. bool is not
    an int here (JSON true would pass as 1); an int where a float belongs is fine."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kind = typing.get_origin(allowed[0]) or allowed[0]  # list[list[int]] -> list
    if value is None:
        return None if type(None) in allowed else _EXPECTED[kind]
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list)}[kind](value)
    return None if ok else _EXPECTED[kind]


_HINTS = typing.get_type_hints(HiMoEConfig)  # the declared type of every field
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list"}


def _first_problem(cfg: HiMoEConfig, flag) -> tuple[str, str] | None:
    """(what is wrong, the fix for a flag) of the first bad value, or None. flag(name): how
    the message names a field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        expected = _type_problem(value, _HINTS[f.name])
        if expected is not None:
            return (f"{flag(f.name)} must be {expected}, got {json.dumps(value, default=str)}",
                    f"pass {expected}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            return f"{flag(name)} must be a positive integer, got {getattr(cfg, name)}", \
                "pass a value of 1 or more"
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            return f"{flag(name)} must be >= 0, got {getattr(cfg, name)}", "pass 0 or more"
    for name, limit in UPPER.items():
        if getattr(cfg, name) > limit:
            return (f"{flag(name)} {getattr(cfg, name)} is above the limit of {limit:,}",
                    "pass a realistic size")
    if cfg.n_embd % cfg.n_head:
        return (f"{flag('n_embd')} {cfg.n_embd} is not divisible by {flag('n_head')} "
                f"{cfg.n_head}", "pick sizes where n_embd % n_head == 0")
    if cfg.top_k_groups > cfg.num_moes:
        return (f"{flag('top_k_groups')} {cfg.top_k_groups} is larger than {flag('num_moes')} "
                f"{cfg.num_moes}", f"use at most {cfg.num_moes}")
    if cfg.router not in router_names():
        return (f"{flag('router')} {cfg.router!r} is not one of {', '.join(router_names())}",
                "pick one of those")
    pool = router_spec(cfg.router).pool(cfg)  # the experts top_k_experts may pick from
    if cfg.top_k_experts > pool:
        return (f"{flag('top_k_experts')} {cfg.top_k_experts} is larger than the {pool} "
                f"experts the {cfg.router} router picks from", f"use at most {pool}")
    for name in RATES:
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            return f"{flag(name)} must be a finite non-negative number, got {value}", \
                "pass a number >= 0"
    if not 0.0 <= cfg.shared_fraction < 1.0:
        return (f"{flag('shared_fraction')} must be in [0, 1) (the shared expert's share of the "
                f"active FFN width), got {cfg.shared_fraction}", "pass e.g. 0.5, or 0 for none")
    for name, example in (("lr", "2e-3"), ("router_lr_scale", "1"), ("expert_lr_scale", "1")):
        if getattr(cfg, name) == 0:
            return f"{flag(name)} must be greater than 0", f"pass e.g. {example}"
    for name in ROUTER_OPTIONS:
        if getattr(cfg, name) and name not in router_spec(cfg.router).options:
            return (f"{flag(name)} is not an option of {flag('router')} {cfg.router}",
                    f"drop {flag(name)}, or pick a router that has it: " + ", ".join(
                        r for r in router_names() if name in router_spec(r).options))
    for name, example in (("dropout", "0.1"), ("router_jitter", "0.01")):
        if getattr(cfg, name) >= 1:
            return f"{flag(name)} must be below 1, got {getattr(cfg, name)}", f"pass e.g. {example}"
    if cfg.router_temp == 0:
        return f"{flag('router_temp')} must be greater than 0", "pass e.g. 1.0"
    if cfg.load_coef and not cfg.noisy_gating:
        return (f"{flag('load_coef')} needs {flag('noisy_gating')} (the smooth load estimate "
                "is a probability under the gating noise)", f"add e.g. {flag('noisy_gating')} 1")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            return (f"{flag(name)} {getattr(cfg, name)!r} is not one of {', '.join(allowed)}",
                    "pick one of those")
    if cfg.group_experts is not None:
        problem = _group_experts_problem(cfg, flag)
        if problem is not None:
            return problem, "restore config.json"
    if cfg.group_shares is not None and not (
            router_spec(cfg.router).group_routers and len(cfg.group_shares) == cfg.num_moes
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                    and math.isfinite(x) for x in cfg.group_shares)):
        return (f"group_shares must list a positive share for each of the {cfg.num_moes} "
                "groups of a hierarchical model", "restore config.json")
    if cfg.expert_index_map is not None:
        problem = _expert_index_map_problem(cfg)
        if problem is not None:
            return problem, "restore config.json"
    memory = machine_memory()
    weight_bytes = 4 * cfg.parameter_estimate()  # float32, as built before any cast
    if memory is not None and weight_bytes > memory:
        return (f"these sizes make a model of about {cfg.parameter_estimate():.2e} parameters "
                f"({weight_bytes / 1e9:,.0f} GB as float32) and this machine has "
                f"{memory / 1e9:,.0f} GB of memory",
                f"use a smaller {flag('n_embd')}, {flag('n_layer')}, {flag('num_moes')}, "
                f"{flag('num_experts')} or {flag('ffn_mult')}")
    return None


def _group_experts_problem(cfg: HiMoEConfig, flag) -> str | None:
    sizes = cfg.group_experts
    if not router_spec(cfg.router).group_routers:
        return (f"group_experts (groups of different sizes) needs the hierarchical router, "
                f"not {cfg.router!r}")
    if not (len(sizes) == cfg.n_layer and all(
            isinstance(row, list) and len(row) == cfg.num_moes and
            all(type(n) is int and 1 <= n <= cfg.num_experts for n in row)
            for row in sizes)):
        return (f"group_experts must list, for each of the {cfg.n_layer} layers, the expert "
                f"count (1-{cfg.num_experts}) of each of the {cfg.num_moes} groups")
    if max(max(row) for row in sizes) != cfg.num_experts:
        return f"{flag('num_experts')} must equal the largest group in group_experts"
    if cfg.top_k_experts > min(min(row) for row in sizes):
        return (f"{flag('top_k_experts')} {cfg.top_k_experts} is larger than the smallest "
                "group")
    return None


def _expert_index_map_problem(cfg: HiMoEConfig) -> str | None:
    rows = cfg.expert_index_map
    if len(rows) == cfg.n_layer and all(
            isinstance(row, list) and len(row) == cfg.num_moes and
            all(_is_index_map(new, size) for new, size in zip(row, cfg.group_sizes(layer)))
            for layer, row in enumerate(rows)):
        return None
    return (f"expert_index_map must list, for each of the {cfg.n_layer} layers and each of "
            f"its {cfg.num_moes} groups, the current index of each original expert (0: "
            "pruned), no index twice")


def _is_index_map(new, size: int) -> bool:
    if not isinstance(new, list) or not all(type(n) is int and 0 <= n <= size for n in new):
        return False
    kept = [n for n in new if n]
    return len(set(kept)) == len(kept)


def machine_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
