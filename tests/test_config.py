"""The typed configuration's own checks."""
import pytest

from serve_app.config import AppArgs
from serve_app.errors import InvalidOption


def test_only_the_models_a_service_offers_pass():
    args = AppArgs(upscalers=["RealESRGAN_x4plus"], face_models=["GFPGANv1.4"])
    args.check_offered(upscaler="RealESRGAN_x4plus", face_model="GFPGANv1.4")
    args.check_offered()  # none named, none refused
    with pytest.raises(InvalidOption, match="not 'RealESRGAN_x2plus'"):  # in the registry, not offered
        args.check_offered(upscaler="RealESRGAN_x2plus")
    with pytest.raises(InvalidOption, match="not 'RestoreFormer'"):
        args.check_offered(upscaler="RealESRGAN_x4plus", face_model="RestoreFormer")
