"""Inference engines: plain PyTorch and numpy, importable and testable without Ray."""
