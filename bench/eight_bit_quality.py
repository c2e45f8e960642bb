"""An experiment: what 8-bit convolutions would cost RealESRGAN_x4plus in quality.

    python -m bench.eight_bit_quality [--out FILE.json]      # any machine, minutes on a CPU; prints JSON

Question: the tail at 70% of the peak needs a tile up to a third cheaper (README, Benchmarks),
and Hopper's tensor cores multiply 8-bit numbers (e4m3 floats, or integers) at twice their
16-bit rate. Would the pictures survive 8 bits? PyTorch has no 8-bit convolution, so this one
emulates the arithmetic such a kernel does: each convolution's input rounded to 8 bits with one
scale for the tensor (its largest magnitude mapped to the format's largest), its weights with one
scale per output channel, the products summed in fp32. Variants, each against fp32 on the same
photo:
- ``fp16``: inputs and weights rounded to fp16 (what the service runs on CUDA);
- ``e4m3`` and ``int8``: every convolution in 8 bits;
- ``e4m3_trunk`` and ``int8_trunk``: the 23 residual blocks' convolutions in 8 bits, the first
  convolution and the upsampling ones in fp16, as 8-bit deployments of CNNs usually keep their
  ends.
Real x4plus weights wherever the store has them (here, the ncnn conversion); four real photos.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data
from torch import nn

from bench.common import experiment_main, psnr, weights_in_use
from serve_app.config import TileConfig, WeightsConfig
from serve_app.engines.networks import load_network
from serve_app.engines.upscaler import Upscaler
from serve_app.weights import WeightsStore, get_spec

MODEL = "RealESRGAN_x4plus"
SIDE = 128  # input side: x4plus costs about 36 GFLOP per 1,000 input pixels, slow on a CPU
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea, "rocket": data.rocket}


def e4m3(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to e4m3 under the scale that maps ``amax`` to e4m3's largest value."""
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale


def int8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to a symmetric 8-bit integer grid whose step maps ``amax`` to 127."""
    scale = amax.clamp(min=1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def per_tensor(rounding):
    return lambda x: rounding(x, x.abs().amax())


def per_channel(rounding):
    return lambda weight: rounding(weight, weight.abs().amax(dim=(1, 2, 3), keepdim=True))


EIGHT_BITS = {"e4m3": e4m3, "int8": int8}


def emulated(network: nn.Module, eight_bit: set[str], rounding=e4m3) -> nn.Module:
    """A copy of ``network`` whose named convolutions in ``eight_bit`` compute in 8 bits
    (``rounding``: ``e4m3`` or ``int8``) and the others in fp16: weights rounded once, each
    input as it arrives."""
    copied = copy.deepcopy(network)
    for name, conv in copied.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        weights, inputs = (per_channel(rounding), per_tensor(rounding)) if name in eight_bit else (fp16, fp16)
        with torch.no_grad():
            conv.weight.copy_(weights(conv.weight))
        conv.register_forward_pre_hook(lambda _module, args, round_input=inputs: (round_input(args[0]),))
    return copied


def upscale(network: nn.Module, bgr: np.ndarray) -> np.ndarray:
    """``bgr`` through ``network`` as the service's engine runs a picture, whole, on the CPU."""
    engine = Upscaler(network, get_spec(MODEL).scale, device=torch.device("cpu"), dtype=torch.float32,
                      tile=TileConfig(size=0))
    return engine.upscale([bgr])[0]


def measure() -> dict:
    folder = Path(tempfile.mkdtemp())
    cache = WeightsConfig().resolved_cache_dir()
    weights = weights_in_use(folder, cache, [MODEL])
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=cache, download=False))
    network = load_network(get_spec(MODEL), store, torch.device("cpu"))
    convs = [name for name, m in network.named_modules() if isinstance(m, nn.Conv2d)]
    trunk = {name for name in convs if name.startswith("body.")}
    networks = {"fp16": emulated(network, set())}
    for name, rounding in EIGHT_BITS.items():
        networks[name] = emulated(network, set(convs), rounding)
        networks[f"{name}_trunk"] = emulated(network, trunk, rounding)
    report: dict = {"model": MODEL, "weights": weights, "torch": torch.__version__, "input_side": SIDE,
                    "photos": {}}
    for photo_name, load in PHOTOS.items():
        bgr = cv2.resize(cv2.cvtColor(load(), cv2.COLOR_RGB2BGR), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        reference = upscale(network, bgr)
        report["photos"][photo_name] = {
            name: psnr(upscale(emulated_net, bgr), reference) for name, emulated_net in networks.items()}
    report["psnr_db_median"] = {
        name: float(np.median([scores[name] for scores in report["photos"].values()])) for name in networks}
    return report


if __name__ == "__main__":
    experiment_main(measure, __doc__)
