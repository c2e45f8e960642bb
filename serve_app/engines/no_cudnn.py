"""Convolutions that skip cuDNN, for input shapes a network may never see again.

PyTorch asks cuDNN for a plan the first time a convolution meets an input shape: about 1 ms
of CPU per convolution (its heuristics list every engine they know). RetinaFace has about
seventy, so the first pass of a new picture size takes several times as long as the next.
Photos come in every size. PyTorch's own convolutions (im2col and a matrix multiply) need no
plan, and a first pass through them costs about what a planned one does (figures in
docs/architecture.md).

``without_cudnn`` makes a twin of a network for those passes: the same modules over the same
parameters (no weight is copied), its 2-D convolutions calling PyTorch's kernels. The network
itself is untouched, so the process's other threads keep cuDNN (``torch.backends.cudnn.flags``
would switch it off for all of them).
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def without_cudnn(network: nn.Module) -> nn.Module:
    """A twin of ``network`` sharing its parameters and buffers, whose ``nn.Conv2d`` layers
    compute without cuDNN (the same results up to rounding: another summation order)."""
    shared = {id(t): t for t in itertools.chain(network.parameters(), network.buffers())}
    twin = copy.deepcopy(network, shared)
    for module in twin.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = _Conv2dWithoutCudnn
    return twin


class _Conv2dWithoutCudnn(nn.Conv2d):
    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):  # not in RetinaFace
            return super()._conv_forward(input, weight, bias)
        return torch._convolution(input, weight, bias, self.stride, self.padding, self.dilation,
                                  False, [0, 0], self.groups, False, False, False, False)
