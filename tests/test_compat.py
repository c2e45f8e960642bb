import importlib
import sys


def test_basicsr_realesrgan_gfpgan_import_on_current_torchvision():
    import serve_app  # noqa: F401

    for name in ("basicsr.data.degradations", "realesrgan", "gfpgan", "facexlib.detection"):
        assert importlib.import_module(name) is not None
    shim = sys.modules["torchvision.transforms.functional_tensor"]
    assert callable(shim.rgb_to_grayscale)
