import contextlib
import io

import cv2
import numpy as np
import pytest
import torch
from gfpgan import GFPGANer
from realesrgan import RealESRGANer

from conftest import ASTRONAUT_FACE, restore_with
from serve_app.config import EngineConfig, TileConfig
from serve_app.engines import face_geometry as geo
from serve_app.engines.face_detection import RetinaFaceDetector, prior_boxes
from serve_app.engines.faces import load_face_engine
from serve_app.engines.local import LocalNetworks
from serve_app.engines.networks import build_network
from serve_app.weights import get_spec

CPU = EngineConfig(device="cpu", tile=TileConfig(size=0))


def answering(detections):
    """A detector that reports ``detections`` for every picture."""
    return lambda images: [detections] * len(images)


@pytest.fixture(scope="module")
def engine(store):
    face_engine = load_face_engine("GFPGANv1.4", store, CPU, max_faces=2)
    face_engine.detector = answering(ASTRONAUT_FACE)  # random RetinaFace weights find nothing real
    return face_engine


@pytest.fixture(scope="module")
def networks(engine, store):
    """The engine above behind the service's orchestration (upscalers loaded as asked, untiled)."""
    local = LocalNetworks(store, CPU, max_faces=2)
    local.face_engines["GFPGANv1.4"] = engine
    return local


def _faces_only(networks, image, **options):
    return restore_with(networks, image, model="none", face_enhance=True, **options)


def _two_crops(astronaut_bgr):
    """Two different aligned faces: the astronaut's, and the one cut the same way from her mirror image."""
    _, landmarks = geo.faces_of(ASTRONAUT_FACE)
    return [geo.align_face(picture, landmarks[0])[0] for picture in (astronaut_bgr, astronaut_bgr[:, ::-1].copy())]


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


def test_paste_back_matches_gfpganer_on_a_real_photo(engine, networks, reference, photo, face_in_photo):
    engine.detector = answering(face_in_photo)
    found, restored, _ = engine.restore_found(photo)
    ours = _faces_only(networks, photo, scale=2)
    crops, faces, theirs = reference(face_in_photo).enhance(photo, paste_back=True)
    assert ours.faces == 1 and ours.pixels.shape == (640, 640, 3)
    np.testing.assert_array_equal(found.crops[0], crops[0])
    np.testing.assert_array_equal(restored[0], faces[0])
    np.testing.assert_array_equal(ours.pixels, theirs)  # on the CPU the paste masks are OpenCV's too


def test_background_upsampler_matches_gfpganer(engine, networks, reference, weights_dir, photo, face_in_photo):
    engine.detector = answering(face_in_photo)
    spec = get_spec("realesr-animevideov3")
    ours = restore_with(networks, photo, model=spec.name, face_enhance=True, scale=2)
    bg = RealESRGANer(scale=4, model_path=str(weights_dir / spec.file.filename), model=build_network(spec),
                      tile=0, pre_pad=10, half=False, device=torch.device("cpu"))
    with contextlib.redirect_stdout(io.StringIO()):
        _, _, theirs = reference(face_in_photo, bg_upsampler=bg).enhance(photo, paste_back=True)
    assert np.abs(ours.pixels.astype(int) - theirs.astype(int)).max() <= 1


def test_aligned_input_matches_gfpganer(networks, reference, astronaut_bgr):
    boxes, landmarks = geo.faces_of(ASTRONAUT_FACE)
    crop, _ = geo.align_face(astronaut_bgr, landmarks[0])  # a real aligned 512x512 face
    ours = _faces_only(networks, crop, aligned=True)
    _, faces, pasted = reference(ASTRONAUT_FACE).enhance(crop, has_aligned=True)
    assert pasted is None and ours.pixels.shape == (512, 512, 3)
    np.testing.assert_array_equal(ours.pixels, faces[0])


def test_strength_blends_restored_and_original(engine, astronaut_bgr):
    _, landmarks = geo.faces_of(ASTRONAUT_FACE)
    crop, _ = geo.align_face(astronaut_bgr, landmarks[0])
    restored = engine.restore([crop], strength=1.0)[0]
    np.testing.assert_array_equal(engine.restore([crop], strength=0.0)[0], crop)
    half = engine.restore([crop], strength=0.5)[0].astype(int)
    assert np.abs(half - (restored.astype(int) + crop) / 2).max() <= 1
    with pytest.raises(ValueError):
        engine.restore([crop], strength=1.5)


def test_grayscale_16bit_and_alpha_keep_their_mode(engine, networks, photo, face_in_photo):
    engine.detector = answering(face_in_photo)
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    out = restore_with(networks, gray, model="realesr-animevideov3", face_enhance=True, scale=2)
    assert out.pixels.shape == (640, 640) and out.faces == 1
    wide = _faces_only(networks, photo.astype(np.uint16) * 257)
    assert wide.pixels.dtype == np.uint16 and wide.pixels.max() > 255
    bgra = np.dstack([photo, np.full(photo.shape[:2], 77, np.uint8)])
    out = _faces_only(networks, bgra)
    assert out.pixels.shape == (320, 320, 4) and (out.pixels[:, :, 3] == 77).all()


def test_face_cap_keeps_the_largest_faces(engine, astronaut_bgr):
    small = ASTRONAUT_FACE.copy()
    small[0, :4] = [400, 400, 420, 420]  # a tiny box, same landmarks: the cap drops it first
    engine.detector = answering(np.concatenate([small, ASTRONAUT_FACE, small]))
    found = engine.find(astronaut_bgr)
    assert found.faces_detected == 3 and len(found.crops) == 2  # max_faces=2
    assert geo.largest_indices([r[:4] for r in np.concatenate([small, ASTRONAUT_FACE, small])], 2, 512, 512) == [0, 1]


def test_real_retinaface_and_restoreformer_run(store, astronaut_bgr):
    networks = LocalNetworks(store, CPU)
    engine = networks.face_engine("RestoreFormer")
    detections = engine.detector([astronaut_bgr])[0]  # the real detector path, random weights
    assert detections.ndim == 2 and detections.shape[1] in (0, 15)
    _, landmarks = geo.faces_of(ASTRONAUT_FACE)
    crop, _ = geo.align_face(astronaut_bgr, landmarks[0])
    out = _faces_only(networks, crop, face_model="RestoreFormer", aligned=True)
    assert out.pixels.shape == (512, 512, 3) and out.pixels.dtype == np.uint8


def _unit_columns(detections, like):
    """Each column over its largest magnitude in ``like`` (random weights give huge boxes)."""
    return detections / np.maximum(np.abs(like).max(axis=0), 1e-6)


def test_batched_detector_matches_facexlibs_detect_faces(store, astronaut_bgr):
    network = load_face_engine("GFPGANv1.4", store, CPU).detector.network
    pictures = [np.ascontiguousarray(astronaut_bgr[:200, :240]), np.ascontiguousarray(astronaut_bgr[90:290, 250:490])]
    # A threshold in the widest gap between scores, so that rounding cannot move a box across it.
    with torch.inference_mode():
        batch = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() - network.mean_tensor
        scores = np.unique(network(batch)[1][:, :, 1].numpy())
    near = scores[(scores > 0.9) & (scores < 0.9999)]
    gap = int(np.argmax(np.diff(near)))
    threshold = float(near[gap] + near[gap + 1]) / 2
    with torch.inference_mode():
        theirs = [network.detect_faces(p, threshold) for p in pictures]
    for first_sight_pixels in (0, 1 << 20):  # each shape's first pass through the network, or its twin
        detector = RetinaFaceDetector(network, threshold, first_sight_pixels=first_sight_pixels)
        ours_alone, ours_batched = [detector([p])[0] for p in pictures], detector(pictures)
        # float32 ResNet-50 sums in another order (a batch of two, padded pictures) differ by
        # about 1e-4 of a column's largest value on some CPUs (1.1e-4 seen on an AMD EPYC); a
        # wrong box, landmark or score would differ by far more.
        for expected, alone, batched in zip(theirs, ours_alone, ours_batched):
            assert len(expected) > 10 and alone.shape == batched.shape == expected.shape
            np.testing.assert_allclose(_unit_columns(alone, expected), _unit_columns(expected, expected), atol=1e-3)
            np.testing.assert_allclose(_unit_columns(batched, expected), _unit_columns(expected, expected),
                                       atol=1e-3)


def test_prior_boxes_equal_facexlibs(store):
    from facexlib.detection.retinaface_utils import PriorBox

    cfg = load_face_engine("GFPGANv1.4", store, CPU).detector.network.cfg
    for height, width in [(512, 512), (37, 91), (1080, 1920)]:
        expected = PriorBox(cfg, image_size=(height, width)).forward().numpy()
        np.testing.assert_array_equal(prior_boxes(cfg, height, width), expected)


@pytest.mark.timeout(600)  # inductor compiles GFPGAN and ParseNet on shared cores: minutes on two
def test_compiled_face_networks_answer_as_eager_ones_face_by_face(engine, store, astronaut_bgr, tmp_path):
    # The engine the face replica runs on CUDA (there as CUDA graphs): GFPGAN and ParseNet
    # compiled for one face, a batch going face by face, kernels saved beside the weights.
    from serve_app.config import WeightsConfig
    from serve_app.weights import WeightsStore

    cached = WeightsStore(WeightsConfig(folder=store.config.folder, cache_dir=tmp_path, download=False))
    compiled = load_face_engine("GFPGANv1.4", cached, CPU.model_copy(update={"compile": "on"}))
    crops = _two_crops(astronaut_bgr)
    ours, theirs = compiled.restore(crops), engine.restore(crops)
    for face, reference, crop in zip(ours, theirs, crops):
        assert np.abs(face.astype(int) - reference.astype(int)).max() <= 2
        np.testing.assert_array_equal(face, compiled.restore([crop])[0])  # alone as in the batch
    for mask, reference in zip(compiled.paste_masks(theirs), engine.paste_masks(theirs)):
        assert np.abs(mask - reference).max() < 1e-3
    saved = sorted(p.name.split("-512-")[0] for p in (tmp_path / "compiled").iterdir())
    assert saved == ["GFPGANv1.4", "parsenet"]


def test_face_models_of_one_replica_share_the_detector_and_the_parser(engine, store):
    from serve_app.engines.faces import FirstOutput

    other = load_face_engine("RestoreFormer", store, CPU.model_copy(update={"compile": "on"}), share_with=engine)
    assert other.detector is engine.detector and other.parser is engine.parser
    # RestoreFormer stays eager even where compiling is on (it failed to compile in fp16)
    assert type(other.restorer) is FirstOutput and other.restorer is not engine.restorer


def test_paste_masks_made_on_a_device_equal_facexlibs_opencv_masks():
    from serve_app.engines.face_tensors import paste_masks_on_device

    rng = np.random.default_rng(0)
    classes = np.zeros((2, 512, 512), np.uint8)
    classes[0, 40:470, 60:450] = 1  # a face, with eyes and a neck (not pasted)
    classes[0, 150:200, 120:220], classes[0, 430:, 200:300] = 4, 14
    classes[1] = rng.integers(0, 19, (512, 512))  # every class, up to every edge
    ours = paste_masks_on_device(torch.from_numpy(classes)).numpy()
    for mask, parsing in zip(ours, classes):
        np.testing.assert_allclose(mask, geo.parse_mask(parsing), rtol=0, atol=1e-12)


def test_pasting_only_the_masks_rectangle_gives_the_whole_canvas_blend_exactly(astronaut_bgr):
    canvas = cv2.resize(astronaut_bgr, (1024, 1024), interpolation=cv2.INTER_LANCZOS4).astype(np.float64)
    _, landmarks = geo.faces_of(ASTRONAUT_FACE)
    face, affine = geo.align_face(astronaut_bgr, landmarks[0])
    classes = np.zeros((512, 512), np.uint8)
    classes[60:460, 80:430] = 1
    mask, inverse = geo.parse_mask(classes), geo.inverse_affine(affine, 2)
    warped_mask = cv2.warpAffine(mask, inverse, (1024, 1024), flags=cv2.INTER_AREA)[:, :, None]
    whole = warped_mask * cv2.warpAffine(face.copy(), inverse, (1024, 1024)) + (1 - warped_mask) * canvas
    patch = geo.face_patch(mask, inverse, (1024, 1024))
    x, y, width, height = patch.rect
    window = canvas[y - 5:y + height + 7, x - 3:x + width + 2].copy()  # as a window over two faces
    geo.blend_face(window, (x - 3, y - 5), face, patch, inverse)
    canvas[y - 5:y + height + 7, x - 3:x + width + 2] = window
    assert 0 < (warped_mask > 0).mean() < 0.5
    np.testing.assert_array_equal(canvas, whole)


def _whole_canvas_paste(canvas: np.ndarray, faces, masks, inverses) -> np.ndarray:
    """facexlib's paste-back as it is written: every face blended over the whole float64 canvas."""
    h, w = canvas.shape[:2]
    blended = canvas.astype(np.float64)
    for face, mask, inverse in zip(faces, masks, inverses):
        weight = cv2.warpAffine(mask, inverse, (w, h), flags=cv2.INTER_AREA)[:, :, None]
        blended = weight * cv2.warpAffine(face, inverse, (w, h)) + (1 - weight) * blended
    return blended.astype(canvas.dtype)


def test_faces_overlapping_or_over_the_edges_paste_as_over_the_whole_canvas(astronaut_bgr):
    from serve_app.cpu.paste import FoundFaces, paste_faces

    _, landmarks = geo.faces_of(ASTRONAUT_FACE)
    face, affine = geo.align_face(astronaut_bgr, landmarks[0])
    classes = np.zeros((512, 512), np.uint8)
    classes[60:460, 80:430] = 1
    mask = geo.parse_mask(classes)
    # the photo's face, one overlapping it, one past the bottom-right edge, one past the top-left
    affines = [affine + np.array([[0, 0, dx], [0, 0, dy]]) for dx, dy in ((0, 0), (-60, -40), (-560, -520),
                                                                          (400, 230))]
    faces = [np.roll(face, 40 * i, axis=1) for i in range(len(affines))]
    found = FoundFaces([face] * len(affines), affines, len(affines))
    for picture in (astronaut_bgr, (astronaut_bgr.astype(np.uint16) * 257)):
        ours = paste_faces(picture, found, faces, [mask] * len(faces), scale=2).image
        canvas = cv2.resize(picture, (1024, 1024), interpolation=cv2.INTER_LANCZOS4)
        scaled = faces if picture.dtype == np.uint8 else [f.astype(np.float32) * (65535.0 / 255.0) for f in faces]
        expected = _whole_canvas_paste(canvas, scaled, [mask] * len(faces),
                                       [geo.inverse_affine(a, 2) for a in affines])
        np.testing.assert_array_equal(ours, expected)


def test_the_face_replica_hands_out_faces_one_by_one_where_the_networks_run_face_by_face(engine, astronaut_bgr):
    import copy

    from serve_app.deployments.faces import restore_and_mask

    crops = _two_crops(astronaut_bgr)
    runs = {}
    for face_by_face in (False, True):
        events, results = [], {}
        watched = copy.copy(engine)
        watched.face_by_face = face_by_face

        def counted(x, events=events):
            events.append(f"restore {len(x)}")
            return engine.restorer(x)

        watched.restorer = counted

        def done(k, face, mask, events=events, results=results):
            events.append(f"done {k}")
            results[k] = (face, mask)

        restore_and_mask(watched, crops, 1.0, True, done)
        runs[face_by_face] = events, results
    # Eager networks gain from a batch: both faces in one pass. Face by face, the first face is
    # handed out before the second is restored.
    assert runs[False][0] == ["restore 2", "done 0", "done 1"]
    assert runs[True][0] == ["restore 1", "done 0", "restore 1", "done 1"]
    for k in (0, 1):  # the k-th crop's face either way (CPU kernels differ by batch size), and its own mask
        (batched_face, batched_mask), (alone_face, alone_mask) = runs[False][1][k], runs[True][1][k]
        assert np.abs(batched_face.astype(int) - alone_face.astype(int)).max() <= 1
        np.testing.assert_array_equal(alone_mask, engine.paste_masks([alone_face])[0])
        np.testing.assert_array_equal(batched_mask, engine.paste_masks([batched_face])[0])


def test_faces_handed_out_one_by_one_equal_those_restored_alone(store, astronaut_bgr, tmp_path):
    # On CUDA (the GPU machine) this is the face replica's own engine: compiled, replayed from
    # CUDA graphs whose output buffers the next face's replay overwrites while the earlier
    # faces' results are still on their way to page-locked memory. On a CPU, the same steps.
    from serve_app.config import WeightsConfig
    from serve_app.weights import WeightsStore

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cached = WeightsStore(WeightsConfig(folder=store.config.folder, cache_dir=tmp_path, download=False))
    engine = load_face_engine("GFPGANv1.4", cached, CPU.model_copy(
        update={"device": device, "compile": "on" if device == "cuda" else "off"}))
    engine.face_by_face = True  # so already where it compiles
    crops = _two_crops(astronaut_bgr)
    each = list(engine.restore_each(crops))
    assert len(each) == len(crops)
    for (face, mask), crop in zip(each, crops):
        alone = engine.restore([crop])[0]
        np.testing.assert_array_equal(face, alone)
        np.testing.assert_array_equal(mask, engine.paste_masks([alone])[0])
