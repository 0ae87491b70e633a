"""The model: Transformer blocks whose FFN is a router plus a stacked expert bank.

The classes import torch, so they load on first use: the router registry
(himoe.model.routers.registry) is read by `himoe --help`, which stays free of torch."""

__all__ = ["DenseFFN", "Expert", "ExpertBank", "GroupedRouter", "HiMoEModel",
           "HierarchicalRouter", "MoELayer", "Routing"]
_HOMES = {"DenseFFN": "experts", "Expert": "experts", "ExpertBank": "experts",
          "MoELayer": "moe", "GroupedRouter": "routers.flat",
          "HierarchicalRouter": "routers.hierarchical", "Routing": "routers.base",
          "HiMoEModel": "transformer"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'himoe.model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"himoe.model.{_HOMES[name]}"), name)
