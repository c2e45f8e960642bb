"""An interruptible network stops within a layer once nobody wants its pass."""
import threading

import pytest
import torch
from torch import nn

from serve_app.engines.interrupt import Abandoned, interruptible, stopping_when


def test_a_pass_stops_at_the_next_module_once_stop_is_true():
    ran = []

    class Step(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            ran.append(self.k)
            return x + 1

    network = interruptible(nn.Sequential(*(Step(k) for k in range(10))))
    with stopping_when(lambda: len(ran) >= 3), pytest.raises(Abandoned):
        network(torch.zeros(1))
    assert ran == [0, 1, 2]
    ran.clear()
    assert network(torch.zeros(1)).item() == 10 and len(ran) == 10  # outside the block: no stop


def test_the_stop_predicate_belongs_to_the_calling_thread():
    network = interruptible(nn.Sequential(nn.Identity(), nn.Identity()))
    results = []

    def other_thread():
        results.append(network(torch.ones(1)).item())  # no predicate here

    with stopping_when(lambda: True):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        with pytest.raises(Abandoned):
            network(torch.ones(1))
    assert results == [1.0]
