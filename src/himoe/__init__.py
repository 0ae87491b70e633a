"""himoe: train, study, modify and serve hierarchical Mixture-of-Experts language models."""

from himoe.config import HiMoEConfig

__all__ = ["Expert", "HiMoEConfig", "HiMoEModel", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model classes import torch: loaded on first use, so `himoe --help` stays light.
    if name in ("Expert", "HiMoEModel"):
        import himoe.model

        return getattr(himoe.model, name)
    raise AttributeError(f"module 'himoe' has no attribute {name!r}")
