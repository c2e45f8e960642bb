import contextlib
import io

import cv2
import numpy as np
import pytest
import torch
from realesrgan import RealESRGANer

from conftest import restore_with
from serve_app.api import RestoreOptions
from serve_app.config import EngineConfig, TileConfig
from serve_app.cpu.tiles import TilePlanner
from serve_app.engines.local import LocalNetworks
from serve_app.engines.networks import build_network
from serve_app.weights import get_spec

UNTILED = EngineConfig(device="cpu", tile=TileConfig(size=0))


def _upscaled(store, config, img, model="RealESRGAN_x4plus", **options) -> np.ndarray:
    return restore_with(LocalNetworks(store, config), img, model=model, **options).pixels


def _reference(name, weights_dir, img, *, tile=0, tile_pad=10, outscale=None, denoise=None):
    spec = get_spec(name)
    path = str(weights_dir / spec.file.filename)
    kwargs = {}
    if denoise is not None:
        path = [path, str(weights_dir / spec.denoise_twin.filename)]
        kwargs["dni_weight"] = [denoise, 1 - denoise]
    upsampler = RealESRGANer(scale=spec.scale, model_path=path, model=build_network(spec), tile=tile,
                             tile_pad=tile_pad, pre_pad=10, half=False, device=torch.device("cpu"), **kwargs)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints per tile
        return upsampler.enhance(img, outscale=outscale)[0]


def _variants(photo):
    return {
        "bgr": photo,
        "gray": cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY),
        "bgra": np.dstack([photo, photo[:, :, 1]]),
        "16bit": photo.astype(np.uint16) * 257,
    }


@pytest.mark.parametrize("variant", ["bgr", "gray", "bgra", "16bit"])
def test_untiled_matches_realesrganer_x4plus(store, weights_dir, small_photo, variant):
    img = _variants(small_photo)[variant]
    ours = _upscaled(store, UNTILED, img)
    theirs = _reference("RealESRGAN_x4plus", weights_dir, img)
    assert ours.shape == theirs.shape == (160, 224) + img.shape[2:] and ours.dtype == img.dtype
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


@pytest.mark.parametrize("name, denoise, outscale", [
    ("RealESRGAN_x2plus", None, None),  # pixel-unshuffle: odd sizes need the mod pad
    ("realesr-animevideov3", None, 2.5),  # float output scale, Lanczos as upstream
    ("realesr-general-x4v3", 0.3, None),  # denoise blend of the two v3 files
])
def test_other_models_match_realesrganer(store, weights_dir, small_photo, name, denoise, outscale):
    img = small_photo[:39, :55]
    ours = _upscaled(store, UNTILED, img, name, denoise=denoise, scale=outscale)
    theirs = _reference(name, weights_dir, img, outscale=outscale, denoise=denoise)
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_tiled_is_close_to_untiled_and_closer_than_official_tiling(store, weights_dir, astronaut_bgr):
    img = np.ascontiguousarray(astronaut_bgr[::4, ::4][:96, :112])
    untiled = _upscaled(store, UNTILED, img)
    tile = TileConfig(size=48, pad=6, blend=4, batch_size=4)
    job = TilePlanner(4, tile).prepare(img)
    assert {x.shape for x in job.inputs()} == {(3, 48, 48)} and len(job.inputs()) > 4
    tiled = _upscaled(store, EngineConfig(device="cpu", tile=tile), img)
    official = _reference("RealESRGAN_x4plus", weights_dir, img, tile=48, tile_pad=6)
    ours_psnr, official_psnr = _psnr(tiled, untiled), _psnr(official, untiled)
    print(f"tiled vs untiled PSNR: ours {ours_psnr:.1f} dB, official tiling {official_psnr:.1f} dB")
    # 50 dB is an RMS error under 0.8 of one 8-bit level: no visible difference, no seam.
    assert ours_psnr >= 50 and ours_psnr >= official_psnr


def test_alpha_bicubic_and_batches_of_mixed_images(store, small_photo):
    networks = LocalNetworks(store, EngineConfig(device="cpu", tile=TileConfig(size=32, pad=4, blend=2)))
    bgra = np.dstack([small_photo, np.linspace(0, 255, small_photo.shape[1], dtype=np.uint8)[None].repeat(40, 0)])
    out = restore_with(networks, bgra, model="realesr-animevideov3", alpha_upsampler="bicubic").pixels
    expected_alpha = cv2.resize(bgra[:, :, 3], (224, 160), interpolation=cv2.INTER_CUBIC)
    assert np.abs(out[:, :, 3].astype(int) - expected_alpha).max() <= 1
    # Tiles of different pictures (8-bit and float) forwarded together, as the upscaler batches
    # requests, give each picture what it gets alone.
    engine, planner = networks.upscaler("realesr-animevideov3"), TilePlanner(4, networks.engine.tile)
    jobs = [planner.prepare(img) for img in (small_photo, small_photo[:20, :30],
                                             cv2.cvtColor(small_photo, cv2.COLOR_BGR2GRAY))]
    together = engine.forward_all([x for job in jobs for x in job.inputs()])
    for job in jobs:
        n = len(job.inputs())
        np.testing.assert_array_equal(planner.finish(job, together[:n]),
                                      planner.finish(job, engine.forward_all(job.inputs())))
        together = together[n:]


def test_a_picture_of_tile_size_is_one_tile(store, astronaut_bgr):
    config = EngineConfig(device="cpu", tile=TileConfig(size=64, pad=8, blend=4))
    img = np.ascontiguousarray(astronaut_bgr[:64, :64])
    assert [x.shape for x in TilePlanner(4, config.tile).prepare(img).inputs()] == [(3, 64, 64)]
    assert _upscaled(store, config, img, "realesr-animevideov3").shape == (256, 256, 3)


def test_a_scale_that_leaves_less_than_a_pixel_is_an_invalid_option(store):
    # found by the fuzz test: a 3x2 picture at scale 0.2 reached OpenCV's resize with a zero size
    from serve_app.errors import InvalidOption

    with pytest.raises(InvalidOption, match="smaller than one pixel"):
        _upscaled(store, UNTILED, np.zeros((2, 3, 3), np.uint8), model="realesr-animevideov3", scale=0.2)


@pytest.mark.parametrize("size, expected", [
    ({"width": 100}, (100, 71)),  # 56x40: the width met, the aspect kept
    ({"height": 33}, (46, 33)),
    ({"width": 100, "height": 60}, (84, 60)),  # fit inside both: the height limits
])
def test_a_target_size_fits_inside_and_keeps_the_aspect(store, small_photo, size, expected):
    out = _upscaled(store, UNTILED, small_photo, model="realesr-animevideov3", **size)
    assert out.shape[1::-1] == expected
    # the very picture of the scale the size stands for
    scale = RestoreOptions(model="realesr-animevideov3", **size).fitted(56, 40, 10**9).scale
    assert scale == pytest.approx(min(t / n for t, n in ((size.get("width"), 56), (size.get("height"), 40)) if t))
    np.testing.assert_array_equal(out, _upscaled(store, UNTILED, small_photo, model="realesr-animevideov3",
                                                 scale=scale))


def test_a_target_size_is_checked_against_the_limits_before_any_work():
    from serve_app.errors import InvalidOption, TooManyPixels

    options = RestoreOptions(model="realesr-animevideov3", width=4000)
    with pytest.raises(TooManyPixels, match="4000x3000"):
        options.fitted(800, 600, max_output_pixels=4000 * 2999)
    assert options.fitted(800, 600, max_output_pixels=4000 * 3000).scale == pytest.approx(5)
    with pytest.raises(InvalidOption, match="the most is x8"):
        options.fitted(400, 300, max_output_pixels=10**9)
    # every width is met exactly, whatever the float rounding of width / input width
    assert all(int(333 * RestoreOptions(width=w).fitted(333, 100, 10**9).scale) == w for w in range(334, 2664))
    with pytest.raises(ValueError, match="not both"):
        RestoreOptions(scale=2, width=100)
