"""The split-trunk experiment (bench/split_trunk.py) computes RRDBNet's trunk: its Triton kernels,
run by Triton's interpreter on the CPU, against the service's split dense blocks."""
from conftest import in_triton_interpreter

CHECK = """
import serve_app._compat
import torch
from basicsr.archs.rrdbnet_arch import RRDBNet
from bench.split_trunk import SplitTrunk
from serve_app.engines.dense_blocks import split_dense_blocks

torch.manual_seed(0)
net = split_dense_blocks(RRDBNet(3, 3, scale=4, num_feat=64, num_block=2, num_grow_ch=32).eval())
x = torch.randn(2, 64, 7, 9)
trunk = SplitTrunk(net.body)
trunk.tuning = {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 1}  # small: the interpreter is slow
with torch.no_grad():
    expected, got = net.body(x), trunk(x)
assert got.shape == expected.shape, (got.shape, expected.shape)
print(float((got - expected).abs().max()), float(expected.abs().max()))
"""


def test_split_trunk_matches_the_split_blocks_in_tritons_interpreter():
    diff, scale = map(float, in_triton_interpreter(CHECK).split())
    assert scale > 1.0  # the blocks did work: not a zero map
    assert diff < 1e-5 * scale
