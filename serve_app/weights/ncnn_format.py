"""Read ncnn ``.param`` graphs and ``.bin`` weight blobs (the parts Real-ESRGAN's models use).

``.param`` is text: the magic line 7767517, a line of counts, then one line per layer:
``type name n_in n_out inputs... outputs... key=value...``; a negative key holds an array
(``-23310=1,2.0e-01``: one value, 0.2). ``.bin`` has no header and no names: each layer's
blobs follow in layer order. A convolution's weights start with a 4-byte tag (0x01306B47:
fp16 values follow, padded to 4 bytes; 0: fp32) and its bias follows as raw fp32; a PReLU's
slopes are raw fp32.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = "7767517"
_FP16_TAG = 0x01306B47
_FP32_TAG = 0


class NcnnFormatError(ValueError):
    """The files are not the ncnn model we expect; never load what follows."""


@dataclass(frozen=True)
class Layer:
    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, str]

    def int_param(self, key: int, default: int | None = None) -> int:
        if key not in self.params:
            if default is None:
                raise NcnnFormatError(f"layer {self.name} lacks parameter {key}")
            return default
        return int(self.params[key])

    def array_param(self, key: int) -> list[float]:
        """A negative-key array parameter (its first value is the count)."""
        raw = self.params.get(key)
        if raw is None:
            return []
        values = raw.split(",")
        count = int(values[0])
        if count != len(values) - 1:
            raise NcnnFormatError(f"layer {self.name}: array {key} announces {count} values")
        return [float(v) for v in values[1:]]


def parse_param(text: str) -> list[Layer]:
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != [MAGIC]:
        raise NcnnFormatError("not an ncnn .param file (magic 7767517 missing)")
    try:
        layer_count, _blob_count = map(int, lines[1])
        layers = [_parse_layer(fields) for fields in lines[2:]]
    except (ValueError, IndexError) as exc:
        raise NcnnFormatError(f"malformed .param line: {exc}") from None
    if len(layers) != layer_count:
        raise NcnnFormatError(f".param announces {layer_count} layers but holds {len(layers)}")
    return layers


def _parse_layer(fields: list[str]) -> Layer:
    kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
    inputs = tuple(fields[4 : 4 + n_in])
    outputs = tuple(fields[4 + n_in : 4 + n_in + n_out])
    params = {}
    for item in fields[4 + n_in + n_out :]:
        key, _, value = item.partition("=")
        params[int(key)] = value
    return Layer(kind, name, inputs, outputs, params)


class BinReader:
    """Sequential reader of a ``.bin`` file that knows how much it consumed."""

    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def _take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.data):
            raise NcnnFormatError(
                f".bin ends at byte {len(self.data)} while reading {what} ({size} bytes at {self.offset})"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def tagged_weights(self, count: int, what: str) -> np.ndarray:
        (tag,) = struct.unpack("<I", self._take(4, f"the tag of {what}"))
        if tag == _FP16_TAG:
            raw = self._take((count * 2 + 3) // 4 * 4, what)  # padded to 4 bytes
            return np.frombuffer(raw[: count * 2], "<f2").astype(np.float32)
        if tag == _FP32_TAG:
            return np.frombuffer(self._take(count * 4, what), "<f4").copy()
        raise NcnnFormatError(f"{what}: unknown weight tag {tag:#010x} (quantised or damaged file?)")

    def raw_f32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self._take(count * 4, what), "<f4").copy()

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise NcnnFormatError(f".bin holds {len(self.data)} bytes but the graph uses {self.offset}")
