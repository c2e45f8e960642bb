import contextlib
import io

import cv2
import numpy as np
import pytest
import torch
from gfpgan import GFPGANer
from realesrgan import RealESRGANer

from conftest import ASTRONAUT_FACE
from serve_app.config import EngineConfig, TileConfig
from serve_app.engines import face_geometry as geo
from serve_app.engines.faces import load_face_engine
from serve_app.engines.networks import build_network
from serve_app.engines.upscaler import load_upscaler
from serve_app.weights import get_spec

CPU = EngineConfig(device="cpu", tile=TileConfig(size=0))


@pytest.fixture(scope="module")
def engine(store):
    face_engine = load_face_engine("GFPGANv1.4", store, CPU, max_faces=2)
    face_engine.detector = lambda bgr: ASTRONAUT_FACE  # random RetinaFace weights find nothing real
    return face_engine


@pytest.fixture(scope="module")
def photo(astronaut_bgr):
    return np.ascontiguousarray(astronaut_bgr[:320, 64:384])  # the astronaut's head and shoulders


@pytest.fixture(scope="module")
def face_in_photo():
    shifted = ASTRONAUT_FACE.copy()
    shifted[0, [0, 2, 5, 7, 9, 11, 13]] -= 64
    return shifted


@pytest.fixture
def reference(weights_dir, tmp_path, monkeypatch):
    """GFPGANer on the same files; facexlib reads its weights from ./gfpgan/weights."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gfpgan" / "weights").mkdir(parents=True)
    for name in ("retinaface_resnet50", "parsenet"):
        filename = get_spec(name).file.filename
        (tmp_path / "gfpgan" / "weights" / filename).symlink_to(weights_dir / filename)

    def make(detections, bg_upsampler=None):
        restorer = GFPGANer(model_path=str(weights_dir / "GFPGANv1.4.pth"), upscale=2, arch="clean",
                            channel_multiplier=2, bg_upsampler=bg_upsampler, device=torch.device("cpu"))
        restorer.face_helper.face_det.detect_faces = lambda img, threshold: detections
        return restorer

    return make


def test_paste_back_matches_gfpganer_on_a_real_photo(engine, reference, photo, face_in_photo):
    engine.detector = lambda bgr: face_in_photo
    ours = engine.enhance(photo, upscale=2)
    crops, faces, theirs = reference(face_in_photo).enhance(photo, paste_back=True)
    assert ours.faces_restored == 1 and ours.image.shape == (640, 640, 3)
    np.testing.assert_array_equal(ours.cropped_faces[0], crops[0])
    np.testing.assert_array_equal(ours.restored_faces[0], faces[0])
    assert np.abs(ours.image.astype(int) - theirs.astype(int)).max() <= 1


def test_background_upsampler_callable_matches_gfpganer(engine, reference, store, weights_dir, photo, face_in_photo):
    engine.detector = lambda bgr: face_in_photo
    spec = get_spec("realesr-animevideov3")
    upscaler = load_upscaler(spec.name, store, CPU)
    ours = engine.enhance(photo, upscale=2,
                          background=lambda img, up: upscaler.upscale([img], outscale=up)[0])
    bg = RealESRGANer(scale=4, model_path=str(weights_dir / spec.file.filename), model=build_network(spec),
                      tile=0, pre_pad=10, half=False, device=torch.device("cpu"))
    with contextlib.redirect_stdout(io.StringIO()):
        _, _, theirs = reference(face_in_photo, bg_upsampler=bg).enhance(photo, paste_back=True)
    assert np.abs(ours.image.astype(int) - theirs.astype(int)).max() <= 1


def test_aligned_input_matches_gfpganer(engine, reference, astronaut_bgr):
    boxes, landmarks = geo.faces_of(ASTRONAUT_FACE)
    crop, _ = geo.align_face(astronaut_bgr, landmarks[0])  # a real aligned 512x512 face
    ours = engine.enhance(crop, aligned=True)
    _, faces, pasted = reference(ASTRONAUT_FACE).enhance(crop, has_aligned=True)
    assert pasted is None and ours.image.shape == (512, 512, 3)
    np.testing.assert_array_equal(ours.image, faces[0])


def test_strength_blends_restored_and_original(engine, astronaut_bgr):
    _, landmarks = geo.faces_of(ASTRONAUT_FACE)
    crop, _ = geo.align_face(astronaut_bgr, landmarks[0])
    restored = engine.restore([crop], strength=1.0)[0]
    np.testing.assert_array_equal(engine.restore([crop], strength=0.0)[0], crop)
    half = engine.restore([crop], strength=0.5)[0].astype(int)
    assert np.abs(half - (restored.astype(int) + crop) / 2).max() <= 1
    with pytest.raises(ValueError):
        engine.restore([crop], strength=1.5)


def test_grayscale_16bit_and_alpha_keep_their_mode(engine, photo, face_in_photo):
    engine.detector = lambda bgr: face_in_photo
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    out = engine.enhance(gray, upscale=2, background=lambda img, up: cv2.resize(img, None, fx=up, fy=up))
    assert out.image.shape == (640, 640) and out.faces_restored == 1
    wide = engine.enhance(photo.astype(np.uint16) * 257, upscale=1)
    assert wide.image.dtype == np.uint16 and wide.image.max() > 255
    bgra = np.dstack([photo, np.full(photo.shape[:2], 77, np.uint8)])
    out = engine.enhance(bgra, upscale=1)
    assert out.image.shape == (320, 320, 4) and (out.image[:, :, 3] == 77).all()


def test_face_cap_keeps_the_largest_faces(engine, astronaut_bgr):
    small = ASTRONAUT_FACE.copy()
    small[0, :4] = [400, 400, 420, 420]  # a tiny box, same landmarks: the cap drops it first
    engine.detector = lambda bgr: np.concatenate([small, ASTRONAUT_FACE, small])
    found = engine.find(astronaut_bgr)
    assert found.faces_detected == 3 and len(found.crops) == 2  # max_faces=2
    assert geo.largest_indices([r[:4] for r in np.concatenate([small, ASTRONAUT_FACE, small])], 2, 512, 512) == [0, 1]


def test_real_retinaface_and_restoreformer_run(store, astronaut_bgr):
    engine = load_face_engine("RestoreFormer", store, CPU)
    detections = engine.detector(astronaut_bgr)  # the real detector path, random weights
    assert detections.ndim == 2 and detections.shape[1] in (0, 15)
    _, landmarks = geo.faces_of(ASTRONAUT_FACE)
    crop, _ = geo.align_face(astronaut_bgr, landmarks[0])
    out = engine.enhance(crop, aligned=True)
    assert out.image.shape == (512, 512, 3) and out.image.dtype == np.uint8
