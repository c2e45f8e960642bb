"""Which calls ``GraphsByShape`` captures, keeps and replays, and what a ``TimedCall`` records.

Capturing needs CUDA; here a recording capture stands in for it, so the policy (second sight,
size bound, most recently used kept) is checked on the CPU. The captured graphs themselves are
checked against plain calls on an H100 by the benchmark's face stage
(``detector_graph_max_abs_diff``). A ``TimedCall``'s function is checked on the CPU too, with
stand-in events.
"""
from __future__ import annotations

import torch

from serve_app.engines.cuda_graphs import GraphsByShape, timed


class RecordingCapture:
    """Records each capture's input shape and answers with the plain call."""

    def __init__(self):
        self.shapes: list[tuple] = []

    def __call__(self, forward, example):
        self.shapes.append(tuple(example.shape))
        return forward


def _graphs(keep: int = 2, max_elements: int = 1000):
    capture = RecordingCapture()
    return GraphsByShape(lambda x: x * 2 + 1, keep=keep, max_elements=max_elements, capture=capture), capture


def test_a_shape_is_captured_the_second_time_it_comes_and_replayed_after():
    graphs, capture = _graphs()
    x = torch.arange(6.0).reshape(2, 3)
    results = [graphs(x) for _ in range(4)]
    assert capture.shapes == [(2, 3)]
    assert graphs.shapes() == [(2, 3)]
    for result in results:
        assert torch.equal(result, x * 2 + 1)


def test_the_most_recently_used_shapes_keep_their_graphs():
    graphs, capture = _graphs(keep=2)
    a, b, c = torch.zeros(1, 4), torch.zeros(2, 4), torch.zeros(3, 4)
    for x in (a, a, b, b):
        graphs(x)
    graphs(a)  # a is now the most recently used
    graphs(c), graphs(c)
    assert graphs.shapes() == [(1, 4), (3, 4)]
    assert capture.shapes == [(1, 4), (2, 4), (3, 4)]
    graphs(b)  # b's graph was dropped, but b is known to recur: captured again at once
    assert capture.shapes[-1] == (2, 4)
    assert graphs.shapes() == [(3, 4), (2, 4)]


def test_large_inputs_and_a_keep_of_zero_always_run_plainly():
    graphs, capture = _graphs(max_elements=10)
    big = torch.ones(4, 4)
    for _ in range(3):
        assert torch.equal(graphs(big), big * 2 + 1)
    off, off_capture = _graphs(keep=0)
    for _ in range(3):
        off(torch.ones(2))
    assert capture.shapes == [] and off_capture.shapes == []
    assert graphs.shapes() == [] and off.shapes() == []


def test_inputs_of_one_shape_but_other_strides_get_graphs_of_their_own():
    graphs, capture = _graphs(keep=4)
    x = torch.zeros(2, 3, 4, 4)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for y in (x, x, channels_last, channels_last):
        graphs(y)
    assert capture.shapes == [(2, 3, 4, 4), (2, 3, 4, 4)]



def test_only_a_shapes_first_call_goes_to_the_first_sight_forward_graphs_or_none():
    for keep, max_elements in ((2, 1000), (0, 1000), (2, 1)):  # graphs; none kept; too large for one
        calls = []
        graphs = GraphsByShape(lambda x: calls.append(("forward", tuple(x.shape))) or x * 2 + 1, keep=keep,
                               max_elements=max_elements, capture=RecordingCapture(),
                               first_sight=lambda x: calls.append(("first sight", tuple(x.shape))) or x * 2 + 1)
        a, b = torch.ones(1, 4), torch.ones(2, 4)
        for x in (a, a, b, a, b, b):
            assert torch.equal(graphs(x), x * 2 + 1)
        # (the recording capture replays by calling forward, so every call is recorded)
        assert calls == [("first sight", (1, 4)), ("forward", (1, 4)), ("first sight", (2, 4)),
                         ("forward", (1, 4)), ("forward", (2, 4)), ("forward", (2, 4))], (keep, max_elements)


class Mark:
    """A stand-in CUDA event: notes in ``log`` when it is recorded."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def record(self):
        self.log.append(self.name)


def test_a_timed_call_times_the_network_alone():
    log = []

    def forward(x):
        log.append("forward")
        return torch.relu(x * 2 - 1)
    prepare = lambda x: x.float().div_(255)  # noqa: E731  (as the upscaler's 8-bit input)
    finish = lambda y: y.mul(255).round().to(torch.uint8)  # noqa: E731
    pixels = torch.arange(48, dtype=torch.uint8).reshape(1, 3, 4, 4)
    result = timed(prepare, forward, finish, Mark("start", log), Mark("end", log))(pixels)
    assert log == ["start", "forward", "end"]  # the conversions outside the two events
    assert torch.equal(result, torch.relu(pixels.float() / 255 * 2 - 1).mul(255).round().to(torch.uint8))
