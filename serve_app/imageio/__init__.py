"""Image bytes in and out: pure functions of numpy, OpenCV and ISA-L (PNG), no torch and no Ray."""
from serve_app.imageio.codec import CONTENT_TYPES, DecodedImage, check_array, decode, default_output_format, encode
from serve_app.imageio.metadata import Metadata
from serve_app.imageio.probe import ImageHeader, probe

__all__ = ["CONTENT_TYPES", "DecodedImage", "ImageHeader", "Metadata", "check_array", "decode", "default_output_format", "encode", "probe"]
