"""himoe: train, study, modify and serve hierarchical Mixture-of-Experts language models."""

from himoe.config import HiMoEConfig
from himoe.model import Expert, HiMoEModel

__all__ = ["Expert", "HiMoEConfig", "HiMoEModel", "__version__"]
__version__ = "0.1.0"
