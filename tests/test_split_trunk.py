"""The split-trunk experiment (bench/split_trunk.py) computes RRDBNet's trunk: its Triton kernels,
run by Triton's interpreter on the CPU, against the service's split dense blocks."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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
    # The interpreter is chosen when the kernels are defined, so it runs in a process of its own.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diff, scale = map(float, done.stdout.split())
    assert scale > 1.0  # the blocks did work: not a zero map
    assert diff < 1e-5 * scale
