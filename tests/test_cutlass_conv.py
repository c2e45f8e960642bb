"""The CUTLASS experiment (bench/cutlass_conv.py) times the convolutions a dense block really has,
in both its forms, and counts their arithmetic as PyTorch does."""
import pytest
import torch
from basicsr.archs.rrdbnet_arch import ResidualDenseBlock
from torch.utils.flop_counter import FlopCounterMode

from bench.cutlass_conv import SIDE, dense_block_convolutions, tflops
from serve_app.engines.dense_blocks import SplitDenseBlock


def test_the_shapes_are_a_dense_blocks_in_both_forms():
    block = ResidualDenseBlock(64, 32)
    layers = [block.conv1, block.conv2, block.conv3, block.conv4, block.conv5]
    assert dense_block_convolutions() == {
        "concatenated": [(c.in_channels, c.out_channels) for c in layers],
        "split": [(p.in_channels, p.out_channels) for p in SplitDenseBlock(block).parts],
    }


def test_the_arithmetic_is_counted_as_pytorch_counts_it():
    conv = torch.nn.Conv2d(32, 96, 3, 1, 1, bias=False)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        conv(torch.zeros(1, 32, SIDE, SIDE))
    # At one millisecond, TFLOP/s is the operation count in units of 10^9.
    assert tflops(1, 32, 96, 1.0) * 1e9 == pytest.approx(counter.get_total_flops())
