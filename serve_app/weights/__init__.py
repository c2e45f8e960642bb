"""Model weights: the registry of official models, verified downloads and loading."""
from serve_app.weights.registry import MODELS, ModelSpec, WeightFile, get_spec
from serve_app.weights.store import WeightsStore

__all__ = ["MODELS", "ModelSpec", "WeightFile", "WeightsStore", "get_spec"]
