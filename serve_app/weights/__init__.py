"""Model weights: the registry of official models, verified downloads and loading.

The registry is plain data; the store (which reads checkpoints with torch) loads on first use,
so that the CPU replicas, which only need the registry, never import torch.
"""
from serve_app.weights.registry import MODELS, ModelSpec, WeightFile, get_spec

__all__ = ["MODELS", "ModelSpec", "WeightFile", "WeightsStore", "get_spec"]


def __getattr__(name: str):
    if name == "WeightsStore":
        from serve_app.weights.store import WeightsStore

        return WeightsStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
