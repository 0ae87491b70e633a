from himoe.model.experts import DenseFFN, Expert, ExpertBank
from himoe.model.moe import MoELayer
from himoe.model.routing import GroupedRouter, HierarchicalRouter, Routing
from himoe.model.transformer import HiMoEModel

__all__ = ["DenseFFN", "Expert", "ExpertBank", "GroupedRouter", "HiMoEModel",
           "HierarchicalRouter", "MoELayer", "Routing"]
