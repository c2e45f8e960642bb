import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.config import TileConfig

from serve_app.engines.tiling import (
    cut_tiles, edge_weights, mod_pad, pad_right_bottom, plan_tiles, stitch, tile_side,
)


def _nearest_x2(tiles: np.ndarray) -> np.ndarray:
    return tiles.repeat(2, axis=2).repeat(2, axis=3)


@pytest.mark.parametrize("height, width", [(64, 64), (100, 64), (157, 211)])
def test_stitching_a_pointwise_network_reproduces_the_whole_image(height, width):
    rng = np.random.default_rng(0)
    img = rng.random((3, height, width), dtype=np.float32)
    plan = plan_tiles(height, width, 64, 64, pad=6, blend=4)
    tiles = cut_tiles(img, plan)
    assert tiles.shape == (plan.count, 3, 64, 64)  # one fixed shape, whatever the image
    out = stitch(_nearest_x2(tiles), plan, scale=2)
    np.testing.assert_allclose(out, _nearest_x2(img[None])[0], atol=1e-6)


def test_plan_covers_the_image_with_the_last_tile_flush():
    plan = plan_tiles(300, 130, 64, 64, pad=6, blend=4)
    assert plan.ys[0] == 0 and plan.ys[-1] == 300 - 64
    assert all(b - a <= 64 - 16 for a, b in zip(plan.ys, plan.ys[1:]))  # overlap >= 2*pad+blend
    with pytest.raises(ValueError):
        plan_tiles(300, 130, 32, 32, pad=6, blend=4)


def test_edge_weights_discard_context_and_ramp():
    w = edge_weights(20, pad=3, blend=4, start_shared=True, end_shared=False)
    assert (w[:3] == 0).all() and (np.diff(w[3:7]) > 0).all() and (w[7:] == 1).all()
    assert (edge_weights(20, 3, 4, False, False) == 1).all()


def test_small_pictures_get_one_smaller_tile_rounded_for_batching():
    assert tile_side(74, 256) == 80 and tile_side(300, 256) == 256 and tile_side(80, 256) == 80
    plan = plan_tiles(80, 300, 80, 64, pad=6, blend=4)
    assert plan.ys == (0,) and plan.count == len(plan.xs)


def test_padding_helpers():
    img = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    padded = pad_right_bottom(img, 2, 5)  # wider than the image: numpy keeps reflecting
    assert padded.shape == (1, 5, 9)
    np.testing.assert_array_equal(padded[0, 3], padded[0, 1])
    assert mod_pad(10, 4) == 2 and mod_pad(12, 4) == 0


def test_tile_config_refuses_tiles_too_small_for_their_margins():
    assert TileConfig(size=96, pad=12, blend=8).size == 96
    assert TileConfig(size=0).size == 0  # whole images
    with pytest.raises(ValidationError):
        TileConfig(size=64, pad=12, blend=8)
