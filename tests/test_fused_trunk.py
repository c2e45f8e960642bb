"""The fused-trunk experiment (bench/fused_trunk.py) computes RRDBNet's trunk: its Triton
kernels, run by Triton's interpreter on the CPU, against basicsr's own blocks."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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
    # The interpreter is chosen when the kernels are defined, so it runs in a process of its own.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diff, scale = map(float, done.stdout.split())
    assert scale > 1.0  # the blocks did work: not a zero map
    assert diff < 1e-5 * scale
