"""Real-ESRGAN's dense blocks rewritten without concatenation, for faster GPU inference.

basicsr's ``ResidualDenseBlock`` concatenates its input with every new feature map before each
of its five 3x3 convolutions (64, 96, 128, 160 and 192 input channels; 32, 32, 32, 32 and 64
output channels). On a GPU that costs twice: each concatenation copies every earlier map again,
and convolutions with 32 output channels keep the tensor cores poorly fed.

A convolution of a concatenation is the sum of the convolutions of its parts. So
``SplitDenseBlock`` convolves each feature map once, as it appears, with the slices of the
weights of every later convolution that reads it (192, 160, 128, 96 and 64 output channels),
and adds up the partial results. The arithmetic is the same (each weight is used once, the
same number of multiply-adds); only its grouping differs, so outputs agree to rounding.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SplitDenseBlock(nn.Module):
    """The function of a basicsr ``ResidualDenseBlock``, computed by feature map, not by layer."""

    def __init__(self, block: nn.Module):
        super().__init__()
        convs = [block.conv1, block.conv2, block.conv3, block.conv4, block.conv5]
        feat, grow = convs[0].in_channels, convs[0].out_channels
        # Input channels of the concatenation that each feature map occupies: x, then x1..x4.
        spans = [(0, feat)] + [(feat + i * grow, feat + (i + 1) * grow) for i in range(4)]
        self.splits = []  # per feature map: output channels of each later convolution it feeds
        self.parts = nn.ModuleList()
        for g, (start, end) in enumerate(spans):
            readers = convs[g:]
            part = nn.Conv2d(end - start, sum(c.out_channels for c in readers), 3, 1, 1, bias=g == 0)
            with torch.no_grad():
                part.weight.copy_(torch.cat([c.weight[:, start:end] for c in readers]))
                if g == 0:  # every convolution's bias, added once
                    part.bias.copy_(torch.cat([c.bias for c in readers]))
            self.parts.append(part)
            self.splits.append([c.out_channels for c in readers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending: list[list[torch.Tensor]] = [[] for _ in self.parts]  # partial sums per convolution
        features = x
        for g, part in enumerate(self.parts):
            for k, piece in enumerate(part(features).split(self.splits[g], dim=1), start=g):
                pending[k].append(piece)
            total = sum(pending[g][1:], pending[g][0])
            if g < len(self.parts) - 1:
                features = F.leaky_relu(total, 0.2)
        return total * 0.2 + x


def split_dense_blocks(network: nn.Module) -> nn.Module:
    """Replace, in place, every basicsr ``ResidualDenseBlock`` of ``network`` by its split form
    (on the same device and in the same number format). Other modules are left as they are."""
    from basicsr.archs.rrdbnet_arch import ResidualDenseBlock

    for name, child in list(network.named_children()):
        if isinstance(child, ResidualDenseBlock):
            weight = child.conv1.weight
            split = SplitDenseBlock(child).to(device=weight.device, dtype=weight.dtype)
            setattr(network, name, split.eval().requires_grad_(False))
        else:
            split_dense_blocks(child)
    return network
