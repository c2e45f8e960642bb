"""The one compatibility shim of the project; installed by ``serve_app/__init__.py`` first.

basicsr 1.4.2 (the last release, imported by realesrgan and gfpgan) does
``from torchvision.transforms.functional_tensor import rgb_to_grayscale``; torchvision 0.17
renamed that module to ``_functional_tensor``, so the import fails on any current torchvision.
A finder placed last on the import path answers the old name with the new module, and only
when that name is imported and found nowhere else: importing serve_app imports no torchvision
(the CPU replicas never load torch at all).
"""
import importlib
import importlib.abc
import importlib.util
import sys

_OLD, _NEW = "torchvision.transforms.functional_tensor", "torchvision.transforms._functional_tensor"


class _Renamed(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != _OLD:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return importlib.import_module(_NEW)

    def exec_module(self, module):
        pass  # the new module, already executed


if not any(isinstance(finder, _Renamed) for finder in sys.meta_path):
    sys.meta_path.append(_Renamed())
