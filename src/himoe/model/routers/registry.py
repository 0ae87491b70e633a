"""The router types, by name (cfg.router, --router): what each one tells the rest of himoe.

A RouterSpec states how to build the router and everything code outside it asks: whether the
FFN is dense, how many experts a token runs, the pool top_k_experts picks from, which router
state goes to which file of the card's layout, and how the Hugging Face export rebuilds it.
register_router adds a type, also one defined outside the package; afterwards training,
saving, loading, --train_only, verify and resume work on it with no other change.

This module imports no torch, so the command line gets its --router choices and help fast;
the built-in routers (hierarchical.py, flat.py beside this file) are imported when the
first one is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from himoe.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from himoe.config import ModelConfig

# The entry of a router file holding loss-free balancing biases: written only when that
# balancing is on (cfg.bias_update_rate > 0), read as zeros when a file lacks it (a plain
# gate swapped in).
BALANCE_BIAS = "balance_bias"
WEIGHT = "weight"  # the gate matrix of a router file, one row per choice

# The flags that balance a router and a value that works, named in the warning for a
# collapsed layer (those still off in the run).
FLAT_LEVERS = (("switch_coef", 0.01), ("bias_update_rate", 1e-3))
# Settings that only some router types read; a type names those it reads in `options`, and
# a run that sets one its router does not read is refused.
ROUTER_OPTIONS = ("seq_switch_coef", "router_jitter", "noisy_gating", "importance_coef",
                  "load_coef", "zero_router_init")


def _top_k(cfg: ModelConfig) -> int:
    return cfg.top_k_experts


def _all_experts(cfg: ModelConfig) -> int:
    return cfg.total_experts


def _flat_gate_params(cfg: ModelConfig) -> int:
    return cfg.total_experts * cfg.n_embd


def _nothing(cfg: ModelConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class RouterSpec:
    """One router type; the defaults suit a flat top-k router over all E experts."""
    name: str  # the --router value, saved in config.json
    help: str  # a few words for --help, e.g. "flat"
    # (cfg, layer) -> the router module of MoE layer `layer` (0-based): its forward maps
    # x_TD to a himoe.model.routers.base.Routing. None: no router and no experts, one dense FFN.
    build: Callable[[ModelConfig, int], nn.Module] | None
    experts_per_token: Callable[[ModelConfig], int] = _top_k
    pool: Callable[[ModelConfig], int] = _all_experts  # the experts top_k_experts picks from
    gate_params: Callable[[ModelConfig], int] = _flat_gate_params  # one layer's router params
    # The card's file layout. main_entries: (file entry, router state) of the layer's router
    # file; None: every persistent state of the router under its own name. group_entries:
    # (file entry, router state stacked over the groups' expert slots, [N, M, ...] or
    # [N * M, ...]): group g's rows go to its own router file, one row per expert. A router
    # with group entries supports groups of different sizes (`himoe experts add`, which
    # widens the WEIGHT and BALANCE_BIAS entries): it must never pick an empty slot (see
    # HierarchicalRouter).
    main_entries: tuple[tuple[str, str], ...] | None = None
    group_entries: tuple[tuple[str, str], ...] = ()
    # How himoe.hf.modeling_himoe rebuilds it (the name it knows); None: no export.
    hf_name: str | None = None
    hf_training_only: tuple[str, ...] = ()  # router state the export leaves out
    balance_levers: tuple[tuple[str, float], ...] = FLAT_LEVERS
    options: tuple[str, ...] = ()  # which of ROUTER_OPTIONS it reads
    # Lines for the balancing that acts at selection time (the trainer's routing summary).
    selection: Callable[[ModelConfig], list[str]] = _nothing
    # The gate matrices (router state names): all zero, every logit is 0 for every token,
    # so every token gets the same combine weights, which `himoe upcycle` relies on to start
    # a MoE that computes what a dense model computes. Empty: it cannot be upcycled.
    gates: tuple[str, ...] = ()

    @property
    def dense(self) -> bool:
        return self.build is None

    @property
    def group_routers(self) -> bool:
        """One router file per group beside the layer's router file."""
        return bool(self.group_entries)


_REGISTRY: dict[str, RouterSpec] = {}


def register_router(spec: RouterSpec) -> RouterSpec:
    """Add a router type; its name becomes a --router choice. Returns spec."""
    if spec.name in _REGISTRY:
        raise ValueError(f"a router named {spec.name!r} is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_router(name: str) -> None:
    """Remove a router type (e.g. one a test registered)."""
    del _REGISTRY[name]


def router_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def router_spec(name: str) -> RouterSpec:
    spec = _REGISTRY.get(name)
    if spec is None:
        raise UserError(f"router {name!r} is not one of {', '.join(_REGISTRY)}")
    return spec


def router_help() -> str:
    """--router's help: every type with its few words."""
    items = [f"{s.name} ({s.help})" for s in _REGISTRY.values()]
    return ", ".join(items[:-1]) + f" or {items[-1]}" if len(items) > 1 else items[0]


# --- the built-in routers ---

def _routing_class(module: str, name: str, per_layer: bool = False):
    """A builder of class `name` of himoe.model.routers.`module`; per_layer: it takes the
    layer (its groups' sizes)."""
    def build(cfg: ModelConfig, layer: int) -> nn.Module:
        import importlib  # torch: imported when a model is built

        cls = getattr(importlib.import_module(f"himoe.model.routers.{module}"), name)
        return cls(cfg, layer) if per_layer else cls(cfg)
    return build


def _grouped_selection(cfg: ModelConfig) -> list[str]:
    return [f"logit-EMA bias correction (tau {cfg.bias_tau}, beta {cfg.ema_beta})",
            "equal traffic per group (top-k inside every group)"]


def _two_level_top_k(cfg: ModelConfig) -> int:
    return cfg.top_k_groups * cfg.top_k_experts


def _one_group(cfg: ModelConfig) -> int:
    return cfg.num_experts


register_router(RouterSpec(
    "hierarchical", "the card's",
    _routing_class("hierarchical", "HierarchicalRouter", per_layer=True),
    experts_per_token=_two_level_top_k, pool=_one_group,
    gate_params=lambda cfg: cfg.num_moes * cfg.n_embd + cfg.total_experts * cfg.n_embd,
    main_entries=((WEIGHT, "main_weight_ND"), (BALANCE_BIAS, "group_bias_N")),
    group_entries=((WEIGHT, "group_weight_NMD"), (BALANCE_BIAS, "expert_bias_E")),
    hf_name="hierarchical", gates=("main_weight_ND", "group_weight_NMD"),
    balance_levers=(("switch_coef", 0.01), ("shared_fraction", 0.5),
                    ("bias_update_rate", 1e-3)), options=ROUTER_OPTIONS))
register_router(RouterSpec(
    "grouped", "Hi-MoE", _routing_class("flat", "GroupedRouter"),
    experts_per_token=lambda cfg: cfg.num_moes * cfg.top_k_experts,  # top-k in every group
    pool=_one_group, gate_params=lambda cfg: cfg.total_experts * (cfg.n_embd + 1),  # + scales
    hf_name="grouped", hf_training_only=("logit_ema_E",),  # corrects training selection only
    selection=_grouped_selection, gates=("weight_ED",)))
register_router(RouterSpec("topk", "flat", _routing_class("flat", "TopKRouter"), hf_name="topk",
                           gates=("weight_ED",)))
register_router(RouterSpec(
    "group_limited", "DeepSeek-V3", _routing_class("flat", "GroupLimitedRouter"),
    pool=lambda cfg: cfg.top_k_groups * cfg.num_experts, hf_name="group_limited",
    gates=("weight_ED",)))
register_router(RouterSpec("dense", "one plain FFN: the baseline", None,
                           experts_per_token=lambda cfg: 1, pool=_one_group, hf_name="dense"))


def build_router(cfg: ModelConfig, layer: int = 0) -> nn.Module | None:
    """The router of MoE layer `layer` (0-based), of the type cfg.router names."""
    return router_spec(cfg.router).build(cfg, layer)
