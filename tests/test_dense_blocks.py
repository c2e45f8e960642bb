import copy

import pytest
import torch
from basicsr.archs.rrdbnet_arch import ResidualDenseBlock, RRDBNet
from torch.utils.flop_counter import FlopCounterMode

from serve_app.config import EngineConfig, TileConfig
from serve_app.engines.dense_blocks import SplitDenseBlock, split_dense_blocks
from serve_app.engines.upscaler import load_upscaler


def _flops(network, x):
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_split_blocks_compute_the_same_function_with_the_same_arithmetic(scale):
    torch.manual_seed(scale)
    original = RRDBNet(3, 3, scale=scale, num_feat=32, num_block=2, num_grow_ch=16).eval()
    split = split_dense_blocks(copy.deepcopy(original))
    assert not any(isinstance(m, ResidualDenseBlock) for m in split.modules())
    assert sum(isinstance(m, SplitDenseBlock) for m in split.modules()) == 6
    x = torch.rand(2, 3, 32, 48)
    with torch.inference_mode():
        expected, got = original(x), split(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert _flops(split, x) == _flops(original, x)


def test_loaded_upscalers_run_the_split_form(store):
    engine = load_upscaler("RealESRGAN_x4plus", store, EngineConfig(device="cpu", tile=TileConfig(size=0)))
    kinds = {type(m) for m in engine.network.modules()}
    assert SplitDenseBlock in kinds and ResidualDenseBlock not in kinds
