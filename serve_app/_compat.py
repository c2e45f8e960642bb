"""The one compatibility shim of the project; imported by ``serve_app/__init__.py`` first.

basicsr 1.4.2 (the last release, imported by realesrgan and gfpgan) does
``from torchvision.transforms.functional_tensor import rgb_to_grayscale``; torchvision 0.17
renamed that module to ``_functional_tensor``, so the import fails on any current torchvision.
Registering the new module under the old name keeps basicsr importable without patching it.
"""
import importlib
import sys

_OLD = "torchvision.transforms.functional_tensor"

if _OLD not in sys.modules:
    try:
        importlib.import_module(_OLD)
    except ImportError:
        sys.modules[_OLD] = importlib.import_module("torchvision.transforms._functional_tensor")
