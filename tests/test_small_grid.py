"""The small-grid experiment (bench/small_grid.py): its upsampling steps compute what RRDBNet's
nearest x2 and 3x3 convolution compute."""
import pytest
import torch
from torch.nn import functional as F

from basicsr.archs.rrdbnet_arch import RRDBNet

from bench.small_grid import NearestUpConv, SmallGridRRDBNet, Tail


def test_a_step_on_the_small_grid_is_the_enlarged_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 5, 3, 1, 1).double()
    x = torch.randn(2, 8, 7, 9, dtype=torch.double)  # odd sides: every border case of both parities
    with torch.no_grad():
        expected = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        got = NearestUpConv(conv)(x)
    assert got.shape == expected.shape == (2, 5, 14, 18)
    assert float((got - expected).abs().max()) < 1e-12 * float(expected.abs().max())


def test_only_plain_3x3_convolutions_are_taken():
    with pytest.raises(ValueError, match="3x3"):
        NearestUpConv(torch.nn.Conv2d(8, 5, 3, 1, 0))


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_the_network_with_small_grid_steps_is_rrdbnet(scale):
    torch.manual_seed(scale)
    network = RRDBNet(3, 3, scale=scale, num_feat=16, num_block=1, num_grow_ch=8).double().eval()
    x = torch.rand(1, 3, 24, 20, dtype=torch.double)
    with torch.no_grad():
        expected = network(x)
        got = SmallGridRRDBNet(network)(x)
        features = torch.randn(1, 16, 6, 5, dtype=torch.double)
        tails = Tail(network, small_grid=True)(features), Tail(network, small_grid=False)(features)
    assert got.shape == expected.shape == (1, 3, 24 * scale, 20 * scale)
    assert float((got - expected).abs().max()) < 1e-9 * float(expected.abs().max())
    assert float((tails[0] - tails[1]).abs().max()) < 1e-9 * float(tails[1].abs().max())
