"""`himoe upcycle`: a MoE model that starts as a saved dense one (sparse upcycling).

Each dense layer's FFN, y = W2 gelu(W1 h + b1) + b2 with H hidden units, is split by hidden
unit; a sum over hidden units splits exactly:
- the shared expert (S = shared_hidden units, half of H by default) is its first S units:
  rows [:S] of W1 and b1, columns [:S] of W2, and b2;
- every routed expert is the other H - S units (so the routed width must be H - S, which
  the default shapes give), its output layer multiplied by c;
- the gates are zero, so every logit is 0 for every token and each token's combine weights
  are the router's uniform probabilities, summing to the same w0 for every token
  (hierarchical top-1/top-1: 1/N * 1/M; top-k: k/E; renormalised or grouped: 1).
  c = 1 / w0, read off the router itself, so w0 * c = 1 and the MoE computes the dense
  model's function at step 0. Without a shared expert the routed experts are the whole FFN
  and carry b2 (times c).
The backbone (embeddings, attention, LayerNorms, tied LM head) and tokenizer are the dense
model's. The logits agree to rounding, not bit for bit: w0 * c rounds (1/6 is no float), and
the FFN's sum over hidden units is done in two parts.

--noise S multiplies every element of each routed expert's tensors by (1 + S u), u uniform
in [-1, 1] and drawn per expert from --seed, so the copies differ and the router can learn
to tell them apart. For the same input h the layer's output then differs from the dense
FFN's by at most, elementwise (W1r, b1r, W2r: the routed units' dense weights),
    S |W2r| (1.13 (1 + S) (|W1r| |h| + |b1r|) + |gelu(W1r h + b1r)|)   (+ S |b2| with no
shared expert), because |gelu'| <= 1.13 and the combine weights times c sum to 1.

The scaled experts make the routed output follow the combine weight: a router that sharpens
(p -> 1) multiplies a routed expert's contribution by up to c, which training sees from the
first step.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from himoe.checkpoint import card as checkpoint
from himoe.checkpoint import card_layout, safe_path
from himoe.config import HiMoEConfig, ModelConfig
from himoe.errors import UserError
from himoe.model import HiMoEModel
from himoe.model.routers.registry import build_router, router_spec
from himoe.training.optim import build_optimizer
from himoe.training.rng import rng_state, seed_everything, set_rng_state

# What the MoE keeps of the dense model's settings: the backbone's shape and the tokenizer.
# Routing and its losses start from himoe's defaults (a dense model never used its own);
# training settings (TrainConfig) are the dense model's.
BACKBONE = ("n_embd", "n_layer", "n_head", "block_size", "dropout", "ffn_mult", "vocab_size",
            "tokenizer", "bpe_vocab_size")


def upcycled_config(dense: HiMoEConfig, given: dict) -> HiMoEConfig:
    """The MoE's settings: the dense model's backbone and training settings, himoe's default
    routing, then the flags given."""
    spec = router_spec(given.get("router", HiMoEConfig.router))
    if spec.dense:
        raise UserError("--router dense makes no MoE; pick a MoE router, e.g. --router "
                        "hierarchical (the default)")
    if not spec.gates:
        raise UserError(f"the {spec.name} router names no gates (RouterSpec.gates), so it "
                        "cannot start out computing the dense model's function; upcycle "
                        "to hierarchical, grouped, topk or group_limited")
    defaults = HiMoEConfig()
    routing = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(ModelConfig)
               if f.name not in BACKBONE}
    cfg = dataclasses.replace(dense, **routing | given).validate()
    routed = dense.ffn_hidden - cfg.shared_hidden
    if routed <= 0:
        raise UserError(f"the dense FFN has {dense.ffn_hidden} hidden units and the shared "
                        f"expert would take {cfg.shared_hidden}, leaving none for the routed "
                        "experts; lower --shared_fraction")
    # The routed width is what the shared expert leaves of the dense FFN.
    return dataclasses.replace(cfg, expert_hidden=0 if routed == cfg.ffn_hidden
                               else routed).validate()


def zero_gates(router: torch.nn.Module, cfg: HiMoEConfig) -> None:
    with torch.no_grad():
        for name in router_spec(cfg.router).gates:
            router.get_parameter(name).zero_()


def step0_weight(cfg: HiMoEConfig) -> float:
    """What a token's combine weights sum to when every gate is zero (the same for every
    token: every logit is 0), as the router computes it."""
    router = build_router(cfg, 0)
    zero_gates(router, cfg)
    router.eval()
    with torch.no_grad():
        return float(router(torch.zeros(1, cfg.n_embd)).weights_TK.sum())


def dense_parts(state: dict, layer: int, shared: int) -> tuple[dict, dict]:
    """(shared expert, routed part) of a dense model's FFN at `layer`, as expert-file
    entries, split by hidden unit: the shared expert its first `shared` units and the output
    bias, the routed part the other units (and the output bias when there is no shared
    expert)."""
    p = f"blocks.{layer}.ffn."
    w1_HD, b1_H, w2_DH, b2_D = (state[p + e] for e, _ in card_layout.EXPERT_ENTRIES)
    shared_part = {"fc1.weight": w1_HD[:shared], "fc1.bias": b1_H[:shared],
                   "fc2.weight": w2_DH[:, :shared], "fc2.bias": b2_D}
    routed = {"fc1.weight": w1_HD[shared:], "fc1.bias": b1_H[shared:],
              "fc2.weight": w2_DH[:, shared:],
              "fc2.bias": torch.zeros_like(b2_D) if shared else b2_D}
    return shared_part, routed


def expert_copies(routed: dict, scale: float, n: int, noise: float,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    """n copies of the routed part as stacked bank tensors ({w1_EDF: ..., ...}), the output
    layer times `scale`, each element times (1 + noise * u), u uniform in [-1, 1]."""
    scaled = routed | {"fc2.weight": routed["fc2.weight"] * scale,
                       "fc2.bias": routed["fc2.bias"] * scale}
    copies = {}
    for entry, name in card_layout.EXPERT_ENTRIES:
        t = scaled[entry].t() if entry in card_layout.TRANSPOSED else scaled[entry]
        stacked = t.expand(n, *t.shape)
        if noise:
            u = torch.rand(stacked.shape, generator=gen, dtype=t.dtype) * 2 - 1
            stacked = stacked * (1 + noise * u)
        copies[name] = stacked.clone()
    return copies


def upcycled_model(dense: HiMoEModel, cfg: HiMoEConfig, noise: float,
                   seed: int) -> HiMoEModel:
    """The MoE built from `dense` as the module docstring says."""
    model = HiMoEModel(cfg)
    state, dense_state = model.state_dict(), dense.state_dict()
    state.update({k: v for k, v in dense_state.items() if ".ffn." not in k})  # the backbone
    c = 1.0 / step0_weight(cfg)
    S, E = cfg.shared_hidden, cfg.total_experts
    gen = torch.Generator().manual_seed(seed)
    for layer, moe in model.moe_layers.items():
        shared, routed = dense_parts(dense_state, layer, S)
        if S:
            state.update({f"blocks.{layer}.shared_ffn.{k}": v for k, v in shared.items()})
        for name, stacked in expert_copies(routed, c, E, noise, gen).items():
            state[card_layout.moe_key(layer, f"experts.{name}")] = stacked
        zero_gates(moe.router, cfg)  # state holds the parameters themselves
    model.load_state_dict(state)
    return model


def fresh_train_state(model: HiMoEModel, cfg: HiMoEConfig, corpus_sha256: str | None) -> dict:
    """train_state.pt of a new run at step 0 (fresh optimiser, the seed's data order and
    dropout stream), so that --resume trains the model as a new run would."""
    before = rng_state()
    seed_everything(cfg.seed + 1)  # as the trainer seeds the dropout stream
    rng = rng_state()
    set_rng_state(before)
    state = {"step": 0, "optimizer": build_optimizer(model, cfg).state_dict(),
             "data_generator": torch.Generator().manual_seed(cfg.seed).get_state(),
             "rng": rng, "skipped_steps": 0}
    if corpus_sha256 is not None:
        state["corpus_sha256"] = corpus_sha256
    return state


def upcycle(from_dir: Path, model_dir: Path, given: dict, noise: float, seed: int,
            force: bool) -> str:
    """Write the upcycled model of the dense model in from_dir to model_dir, in one atomic
    save; returns one line saying what was written."""
    from_dir, model_dir = Path(from_dir), Path(model_dir)
    if not math.isfinite(noise) or noise < 0:
        raise UserError(f"--noise must be a finite number >= 0, got {noise}; e.g. 0.01")
    if not from_dir.is_dir():
        raise UserError(f"--from {from_dir} is not a directory; name the model directory "
                        "that `himoe train --router dense` wrote")
    dense_cfg, vocab, step = checkpoint.read_config(from_dir)
    if not router_spec(dense_cfg.router).dense:
        raise UserError(f"--from {from_dir} holds a {dense_cfg.router} MoE model, not a dense "
                        "one; upcycle a model trained with `himoe train --router dense`")
    checkpoint.check_model_dir_flag(str(model_dir))
    if model_dir.exists() and model_dir.resolve() == from_dir.resolve():
        raise UserError(f"--model_dir {model_dir} is --from itself; write the MoE to a new "
                        "directory")
    cfg = upcycled_config(dense_cfg, given)
    checkpoint.check_model_dir_writable(model_dir)
    with checkpoint.new_model_dir_lock(model_dir, force):
        dense, _, _, _ = checkpoint.load_model(from_dir)
        tokenizer = checkpoint.load_tokenizer(from_dir)
        sha = None  # the corpus the dense model trained on, so a resume checks it
        if safe_path.lstat(from_dir, checkpoint.TRAIN_STATE_FILE) is not None:
            sha = checkpoint.load_weight_file(from_dir, checkpoint.TRAIN_STATE_FILE,
                                              plain=False).get("corpus_sha256")
        model = upcycled_model(dense, cfg, noise, seed)
        checkpoint.save_model(model, vocab, 0, model_dir, config=cfg, extra={
            checkpoint.TRAIN_STATE_FILE: fresh_train_state(model, cfg, sha),
            checkpoint.METRICS_FILE: "", **tokenizer.files()})
    total, active = model.parameter_counts()
    how = f", perturbed by noise {noise} (seed {seed})" if noise else ""
    drops = (f" (note: --capacity_factor {cfg.capacity_factor} drops the assignments over an "
             "expert's capacity, so step 0 is not exactly the dense model)"
             if cfg.capacity_factor else "")
    shared = (f"the shared expert its first {cfg.shared_hidden} hidden units, "
              if cfg.shared_hidden else "")
    return (f"upcycled {from_dir} (dense, step {step}) into {model_dir}: {cfg.n_layer} layer(s) "
            f"of {cfg.num_moes} groups x {cfg.num_experts} experts ({cfg.router} router), "
            f"{shared}every routed expert its other {cfg.ffn_hidden}{how}; {total / 1e6:.2f}M "
            f"parameters, {active / 1e6:.2f}M active. Step 0: continue with `himoe train "
            f"--model_dir {model_dir} --resume --max_iters K`{drops}")
