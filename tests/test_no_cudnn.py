"""``without_cudnn``: a twin of a network that computes the same by another route.

What it saves is cuDNN's planning for a new shape, which only a GPU shows
(``python -m bench.detector_shapes``); here the results, the shared weights and the untouched
original are checked, on the face detector the service builds it for.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from serve_app.engines.networks import build_network
from serve_app.engines.no_cudnn import without_cudnn
from serve_app.weights import get_spec


@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 1),
                                                                 ((2, 1), (1, 0), 1, 2), (1, "same", 1, 1)])
def test_a_convolutions_twin_gives_the_same_results_over_the_same_weights(stride, padding, dilation, groups):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(4, 6, 3, stride, padding, dilation, groups), nn.ReLU())
    twin = without_cudnn(network)
    assert twin[0].weight is network[0].weight and twin[0].bias is network[0].bias
    assert type(network[0]) is nn.Conv2d and type(twin[0]) is not nn.Conv2d
    x = torch.randn(2, 4, 17, 13)
    with torch.inference_mode():
        assert torch.equal(twin(x), network(x))


def test_retinafaces_twin_answers_as_retinaface_does():
    network = build_network(get_spec("retinaface_resnet50")).eval()
    twin = without_cudnn(network)
    convolutions = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) > 50
    assert all(type(m) is nn.Conv2d for m in convolutions)  # the network itself is untouched
    assert all(type(m) is not nn.Conv2d for m in twin.modules() if isinstance(m, nn.Conv2d))
    assert {id(p) for p in twin.parameters()} == {id(p) for p in network.parameters()}
    x = torch.randn(1, 3, 96, 128) * 50
    with torch.inference_mode():
        for ours, theirs in zip(twin(x), network(x)):
            assert torch.equal(ours, theirs)
