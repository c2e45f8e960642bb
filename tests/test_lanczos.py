import cv2
import numpy as np
import pytest

from serve_app.engines.lanczos import lanczos_upscale


def _opencv(img, scale):
    h, w = img.shape[:2]
    return cv2.resize(img, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_LANCZOS4)


@pytest.mark.parametrize("scale", [2, 4, 8, 2.0])
@pytest.mark.parametrize("shape", [(512, 512, 3), (301, 257, 3), (37, 53, 4), (300, 200), (260, 7, 1),
                                   (1, 9, 3), (5, 2, 3)])
def test_whole_number_scales_give_opencvs_bytes(shape, scale):
    # 301 rows: three bands, so band edges are checked inside a picture; tiny ones: every tap replicates an edge.
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    ours, theirs = lanczos_upscale(img, scale), _opencv(img, scale)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs)


def test_extremes_saturate_and_round_as_opencv():
    # Black and white stripes drive the negative lobes past 0 and 255; a ramp visits every rounding.
    stripes = np.zeros((40, 40, 3), np.uint8)
    stripes[:, ::2] = 255
    stripes[::3] = 255 - stripes[::3]
    ramp = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    for img in (stripes, ramp):
        assert np.array_equal(lanczos_upscale(img, 2), _opencv(img, 2))


@pytest.mark.parametrize("img, scale", [
    (np.full((20, 30, 3), 40000, np.uint16), 2),  # 16-bit
    (np.full((20, 30, 3), 40, np.uint8), 3),       # a scale with no exact float32 phase
    (np.full((20, 30, 3), 40, np.uint8), 1.5),
])
def test_other_depths_and_scales_are_opencvs_own(img, scale):
    assert np.array_equal(lanczos_upscale(img, scale), _opencv(img, scale))
