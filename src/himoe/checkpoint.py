"""Stacked in-memory weights <-> the card's modular checkpoint, one file per expert and router.

    config.json                      hyperparameters, vocabulary, last saved step
    backbone.pt                      embeddings, attention, LayerNorms (LM head is tied)
    [layer_LL_]main_router.pt        level-1 gate: {"weight": [N, D]}
    [layer_LL_]moe_expert_00G/
        router.pt                    level-2 gate of group G: {"weight": [M, D]}
        model_00J.pt                 expert J: {"fc1.weight": [F, D], "fc1.bias": [F],
                                                "fc2.weight": [D, F], "fc2.bias": [D]}
    train_state.pt                   optimiser, schedule, RNG and data position (for --resume)

The `layer_LL_` prefix appears only when n_layer > 1, as the card lists. Group and expert
numbers are 1-based, as in the card. Every .pt file is a plain state_dict that loads with
torch.load(..., weights_only=True); an expert file loads into himoe.Expert on its own.
This is the only module that knows both the stacked and the per-file layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from himoe.config import HiMoEConfig
from himoe.errors import UserError
from himoe.model import HiMoEModel

CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


def layer_prefix(cfg: HiMoEConfig, layer: int) -> str:
    return f"layer_{layer + 1:02d}_" if cfg.n_layer > 1 else ""


def main_router_file(cfg: HiMoEConfig, layer: int) -> str:
    return f"{layer_prefix(cfg, layer)}main_router.pt"


def group_dir(cfg: HiMoEConfig, layer: int, group: int) -> str:
    return f"{layer_prefix(cfg, layer)}moe_expert_{group + 1:03d}"


def group_router_file(cfg: HiMoEConfig, layer: int, group: int) -> str:
    return f"{group_dir(cfg, layer, group)}/router.pt"


def expert_file(cfg: HiMoEConfig, layer: int, group: int, expert: int) -> str:
    return f"{group_dir(cfg, layer, group)}/model_{expert + 1:03d}.pt"


def _moe_key(layer: int, name: str) -> str:
    return f"blocks.{layer}.ffn.{name}"


def to_files(model: HiMoEModel) -> dict[str, dict[str, torch.Tensor]]:
    """{relative path: state_dict} for every weight file. Tensors are cloned so that each
    file holds only its own slice, not the whole stacked storage."""
    cfg = model.cfg
    state = model.state_dict()
    moe_layers = model.moe_layers
    backbone = {k: v.clone() for k, v in state.items()
                if k != "lm_head.weight" and not any(k.startswith(f"blocks.{i}.ffn.")
                                                     for i in moe_layers)}
    files = {"backbone.pt": backbone}
    M = cfg.num_experts
    for layer in sorted(moe_layers):
        if cfg.router == "hierarchical":
            files[main_router_file(cfg, layer)] = {
                "weight": state[_moe_key(layer, "router.main_weight_ND")].clone()}
            group_w = state[_moe_key(layer, "router.group_weight_NMD")]
            for g in range(cfg.num_moes):
                files[group_router_file(cfg, layer, g)] = {"weight": group_w[g].clone()}
        else:  # one router over all experts, with its buffers (e.g. the logit EMA)
            prefix = _moe_key(layer, "router.")
            files[main_router_file(cfg, layer)] = {
                k.removeprefix(prefix): v.clone() for k, v in state.items() if k.startswith(prefix)}
        w1 = state[_moe_key(layer, "experts.w1_EDF")]
        b1 = state[_moe_key(layer, "experts.b1_EF")]
        w2 = state[_moe_key(layer, "experts.w2_EFD")]
        b2 = state[_moe_key(layer, "experts.b2_ED")]
        for g in range(cfg.num_moes):
            for j in range(M):
                e = g * M + j
                files[expert_file(cfg, layer, g, j)] = {
                    "fc1.weight": w1[e].t().contiguous(), "fc1.bias": b1[e].clone(),
                    "fc2.weight": w2[e].t().contiguous(), "fc2.bias": b2[e].clone()}
    return files


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"model file {path} is missing; re-save the model or copy the file back")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for refused or broken files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path} as plain weights ({first}); replace the file "
                        "with one saved by himoe") from None


def from_files(model: HiMoEModel, model_dir: Path) -> None:
    """Fill `model` (already built from config.json) from the per-file layout."""
    cfg = model.cfg
    state = {}
    moe_layers = model.moe_layers
    state.update(load_weight_file(model_dir / "backbone.pt"))
    state["lm_head.weight"] = state.get("tok_emb.weight")
    M = cfg.num_experts
    for layer in moe_layers:
        if cfg.router == "hierarchical":
            state[_moe_key(layer, "router.main_weight_ND")] = _get(
                model_dir, main_router_file(cfg, layer), "weight")
            state[_moe_key(layer, "router.group_weight_NMD")] = torch.stack([
                _get(model_dir, group_router_file(cfg, layer, g), "weight")
                for g in range(cfg.num_moes)])
        else:
            router = load_weight_file(model_dir / main_router_file(cfg, layer))
            state.update({_moe_key(layer, f"router.{k}"): v for k, v in router.items()})
        w1, b1, w2, b2 = [], [], [], []
        for g in range(cfg.num_moes):
            for j in range(M):
                sd = load_weight_file(model_dir / expert_file(cfg, layer, g, j))
                name = expert_file(cfg, layer, g, j)
                w1.append(_pick(sd, "fc1.weight", name).t())
                b1.append(_pick(sd, "fc1.bias", name))
                w2.append(_pick(sd, "fc2.weight", name).t())
                b2.append(_pick(sd, "fc2.bias", name))
        for name, parts in (("w1_EDF", w1), ("b1_EF", b1), ("w2_EFD", w2), ("b2_ED", b2)):
            state[_moe_key(layer, f"experts.{name}")] = _stack(parts, model_dir, layer)
    expected = model.state_dict()
    for key, want in expected.items():
        got = state.get(key)
        if got is None:
            raise UserError(f"{model_dir}: weights for {key} are missing from backbone.pt; "
                            "re-save the model")
        if got.shape != want.shape:
            raise UserError(f"{model_dir}: {key} has shape {tuple(got.shape)} but config.json "
                            f"needs {tuple(want.shape)}; restore the matching file")
    model.load_state_dict({k: state[k] for k in expected})


def _pick(sd: dict, key: str, name: str) -> torch.Tensor:
    if key not in sd:
        raise UserError(f"{name} has no '{key}' entry; replace it with an expert file saved "
                        "by himoe")
    return sd[key]


def _get(model_dir: Path, name: str, key: str) -> torch.Tensor:
    return _pick(load_weight_file(model_dir / name), key, name)


def _stack(parts: list[torch.Tensor], model_dir: Path, layer: int) -> torch.Tensor:
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) > 1:
        raise UserError(f"{model_dir}: experts of layer {layer + 1} have different shapes "
                        f"{sorted(shapes)}; every expert of a layer must match")
    return torch.stack(parts)


# --- atomic writes: a crash leaves the old file or the new one, never half of one ---

def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- whole model directory ---

def check_model_dir_writable(model_dir: Path) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"--model_dir {model_dir} is a file; pass a directory path")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --model_dir {model_dir} ({e.strerror}); pick a "
                        "writable location") from None
    if not os.access(model_dir, os.W_OK):
        raise UserError(f"--model_dir {model_dir} is not writable; pick a writable location")


def save_model(model: HiMoEModel, vocab: list[str], step: int, model_dir: Path) -> None:
    """Weight files first, config.json last: config.json's step names a complete save."""
    model_dir = Path(model_dir)
    for name, sd in to_files(model).items():
        atomic_save(sd, model_dir / name)
    meta = {"himoe_format": FORMAT_VERSION, "step": step, "vocab": vocab,
            "config": model.cfg.to_dict()}
    atomic_write_text(json.dumps(meta, indent=2), model_dir / CONFIG_FILE)


def read_config(model_dir: Path) -> tuple[HiMoEConfig, list[str], int]:
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_FILE
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist; train one first with "
                        f"`himoe train --model_dir {model_dir}`")
    if not path.is_file():
        raise UserError(f"{path} is missing; {model_dir} is not a himoe model directory")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        cfg = HiMoEConfig.from_dict(meta["config"])
        vocab, step = list(meta["vocab"]), int(meta["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is broken ({type(e).__name__}: {e}); restore it from a "
                        "backup or re-train") from None
    if cfg.vocab_size != len(vocab):
        raise UserError(f"{path}: vocab_size {cfg.vocab_size} does not match the "
                        f"{len(vocab)}-entry vocabulary; restore the file")
    cfg.validate()
    return cfg, vocab, step


def load_model(model_dir: Path, device: str | torch.device = "cpu"):
    """(model, cfg, vocab, step) from a modular checkpoint; nothing is unpickled."""
    model_dir = Path(model_dir)
    cfg, vocab, step = read_config(model_dir)
    model = HiMoEModel(cfg)
    from_files(model, model_dir)
    return model.to(device), cfg, vocab, step
