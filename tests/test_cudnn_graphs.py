"""The cuDNN graphs experiment (bench/cudnn_graphs.py): the plain block's compiled epilogues
finish a convolution's channels in place, inside the shared buffer, and touch nothing else."""
import torch
from torch.nn import functional as F

from bench.cudnn_graphs import RESIDUAL, SLOPE, _finish_block, _finish_map


def _buffer(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, 192, 6, 7).contiguous(memory_format=torch.channels_last)


def test_a_new_maps_bias_and_leaky_relu_land_in_its_own_channels():
    here, bias = _buffer(0), torch.randn(32)
    before = here.clone()
    _finish_map(here[:, 64:96], bias)  # a strided view: 32 of each pixel's 192 channels
    assert torch.allclose(here[:, 64:96], F.leaky_relu(before[:, 64:96] + bias.view(1, -1, 1, 1), SLOPE))
    assert torch.equal(here[:, :64], before[:, :64]) and torch.equal(here[:, 96:], before[:, 96:])


def test_the_blocks_output_is_its_scaled_sum_plus_its_input():
    here, there, bias = _buffer(1), _buffer(2), torch.randn(64)
    before = there.clone()
    _finish_block(there[:, :64], bias, here[:, :64])
    expected = (before[:, :64] + bias.view(1, -1, 1, 1)) * RESIDUAL + here[:, :64]
    assert torch.allclose(there[:, :64], expected, atol=1e-6)
    assert torch.equal(there[:, 64:], before[:, 64:])
