"""The 8-bit emulation behind bench/eight_bit_quality.py: how e4m3 and int8 round, and which convolutions."""
import torch
from basicsr.archs.rrdbnet_arch import RRDBNet
from torch import nn

from bench.eight_bit_quality import E4M3_MAX, e4m3, emulated, int8, per_channel, per_tensor


def test_a_tensor_in_e4m3_keeps_its_largest_value_and_three_bits_of_the_rest():
    x = torch.randn(4096) * 3
    rounded = per_tensor(e4m3)(x)
    assert torch.isclose(rounded.abs().max(), x.abs().max(), rtol=1e-6)
    scale = x.abs().max() / E4M3_MAX
    normal = (x / scale).abs() >= 2.0 ** -6  # e4m3's smallest normal number
    relative = ((rounded - x).abs() / x.abs())[normal]
    assert relative.max() <= 2.0 ** -4  # three mantissa bits: half a step of 1/8
    assert relative.max() > 2.0 ** -8  # and really rounded to fewer bits than fp16 keeps


def test_a_tensor_in_int8_lies_on_a_grid_of_255_steps_ending_at_its_largest_value():
    x = torch.randn(4096)
    step = x.abs().max() / 127
    rounded = per_tensor(int8)(x)
    assert torch.isclose(rounded.abs().max(), x.abs().max(), rtol=1e-6)
    assert (rounded - x).abs().max() <= step / 2 * (1 + 1e-5)
    assert torch.allclose(rounded / step, (rounded / step).round(), atol=1e-4)
    assert len(torch.unique(rounded)) <= 255


def test_weights_get_a_scale_per_output_channel():
    weight = torch.randn(4, 3, 3, 3) * torch.tensor([1e-3, 1.0, 10.0, 100.0]).view(4, 1, 1, 1)
    rounded = per_channel(e4m3)(weight)
    for channel in range(4):
        assert torch.isclose(rounded[channel].abs().max(), weight[channel].abs().max(), rtol=1e-6)


def test_the_emulated_copy_rounds_the_named_convolutions_and_leaves_the_network_alone():
    torch.manual_seed(0)
    network = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=1, num_grow_ch=8, scale=4).eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    convs = {name: m for name, m in network.named_modules() if isinstance(m, nn.Conv2d)}
    trunk = {name for name in convs if name.startswith("body.")}
    copied = emulated(network, trunk)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    for name, conv in copied.named_modules():
        if name in convs:
            original = convs[name].weight
            rounded = per_channel(e4m3)(original) if name in trunk else original.half().float()
            assert torch.equal(conv.weight, rounded), name
    x = torch.rand(1, 3, 12, 12)
    with torch.inference_mode():
        exact = network(x)
        half_error = (emulated(network, set())(x) - exact).abs().max()
        e4m3_error = (emulated(network, set(convs))(x) - exact).abs().max()
        int8_error = (emulated(network, set(convs), int8)(x) - exact).abs().max()
    assert 0 < half_error < 1e-2
    assert e4m3_error > 4 * half_error  # e4m3 keeps 3 bits of mantissa where fp16 keeps 10
    assert int8_error > 4 * half_error
