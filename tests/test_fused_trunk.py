"""The fused-trunk experiment (bench/fused_trunk.py) computes RRDBNet's trunk: its Triton
kernels, run by Triton's interpreter on the CPU, against basicsr's own blocks."""
from conftest import in_triton_interpreter

CHECK = """
import serve_app._compat
import torch
from basicsr.archs.rrdbnet_arch import RRDBNet
from bench.fused_trunk import FusedTrunk

torch.manual_seed(0)
net = RRDBNet(3, 3, scale=4, num_feat=64, num_block=2, num_grow_ch=32).eval()
x = torch.randn(2, 64, 7, 9)
with torch.no_grad():
    expected, got = net.body(x), FusedTrunk(net.body)(x)
assert got.shape == expected.shape, (got.shape, expected.shape)
print(float((got - expected).abs().max()), float(expected.abs().max()))
"""


def test_fused_trunk_matches_basicsrs_blocks_in_tritons_interpreter():
    diff, scale = map(float, in_triton_interpreter(CHECK).split())
    assert scale > 1.0  # the blocks did work: not a zero map
    assert diff < 1e-5 * scale
