import hashlib
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from serve_app.config import WeightsConfig
from serve_app.errors import WeightsCorrupt, WeightsUnavailable
from serve_app.weights import MODELS, WeightsStore, get_spec
from serve_app.weights.registry import WeightFile
from serve_app.weights.store import blend_state_dicts, read_state_dict

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path == "/cut.pth":  # the connection drops halfway through the body
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _store_for(tmp_path, url, sha, **config):
    # No ncnn twin: these tests are about the download path alone.
    spec = replace(get_spec("RealESRGAN_x4plus"), file=WeightFile("model.pth", url, sha), ncnn=None)
    store = WeightsStore(WeightsConfig(cache_dir=tmp_path / "cache", **config))
    return spec, store


def _cache_listing(tmp_path):
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_registry_lists_every_official_model_with_url():
    expected = {
        "RealESRGAN_x4plus", "RealESRNet_x4plus", "RealESRGAN_x4plus_anime_6B", "RealESRGAN_x2plus",
        "realesr-animevideov3", "realesr-general-x4v3", "GFPGANv1.3", "GFPGANv1.4", "RestoreFormer",
        "retinaface_resnet50", "parsenet",
    }
    assert set(MODELS) == expected
    for spec in MODELS.values():
        for file in spec.files:
            assert file.url.startswith("https://github.com/") and file.url.endswith(file.filename)
            assert file.sha256 is None or len(file.sha256) == 64
    assert get_spec("realesr-general-x4v3").denoise_twin.filename == "realesr-general-wdn-x4v3.pth"


def test_good_download_lands_in_cache(tmp_path, server):
    spec, store = _store_for(tmp_path, f"{server}/good.pth", PAYLOAD_SHA)
    path = store.fetch(spec, spec.file)
    assert path == tmp_path / "cache" / "model.pth" and path.read_bytes() == PAYLOAD
    assert _cache_listing(tmp_path) == ["model.pth"]
    assert store.status(spec)["files"][0] == {"file": "model.pth", "present": True, "source": "cache",
                                                 "ncnn_fallback": False}


def test_wrong_checksum_leaves_nothing(tmp_path, server):
    spec, store = _store_for(tmp_path, f"{server}/good.pth", "0" * 64)
    with pytest.raises(WeightsCorrupt, match="SHA-256"):
        store.fetch(spec, spec.file)
    assert _cache_listing(tmp_path) == []


def test_connection_cut_mid_file_leaves_nothing(tmp_path, server):
    spec, store = _store_for(tmp_path, f"{server}/cut.pth", PAYLOAD_SHA)
    with pytest.raises(WeightsUnavailable):
        store.fetch(spec, spec.file)
    assert _cache_listing(tmp_path) == []


def test_offline_error_names_model_file_url_and_setting(tmp_path):
    url = "http://127.0.0.1:9/RealESRGAN_x4plus.pth"  # port 9 (discard): nothing listens
    spec, store = _store_for(tmp_path, url, PAYLOAD_SHA)
    with pytest.raises(WeightsUnavailable) as info:
        store.fetch(spec, spec.file)
    message = str(info.value)
    for needle in ("RealESRGAN_x4plus", "model.pth", url, "weights.paths", "weights.folder"):
        assert needle in message
    assert info.value.status == 503


def test_downloads_off_or_unpinned_are_refused_with_a_hint(tmp_path, server):
    spec, store = _store_for(tmp_path, f"{server}/good.pth", PAYLOAD_SHA, download=False)
    with pytest.raises(WeightsUnavailable, match="weights.download"):
        store.fetch(spec, spec.file)
    spec, store = _store_for(tmp_path, f"{server}/good.pth", None)
    with pytest.raises(WeightsUnavailable, match="no pinned SHA-256"):
        store.fetch(spec, spec.file)
    assert _cache_listing(tmp_path) == []


def test_resolution_order_path_then_folder_then_cache(tmp_path):
    spec = get_spec("RealESRGAN_x4plus")
    name = spec.file.filename
    for folder in ("explicit", "folder", "cache"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(folder.encode())
    config = dict(folder=tmp_path / "folder", cache_dir=tmp_path / "cache", download=False)
    explicit = WeightsStore(WeightsConfig(paths={spec.name: tmp_path / "explicit" / name}, **config))
    assert explicit.fetch(spec, spec.file).read_bytes() == b"explicit"
    assert WeightsStore(WeightsConfig(**config)).fetch(spec, spec.file).read_bytes() == b"folder"
    (tmp_path / "folder" / name).unlink()
    assert WeightsStore(WeightsConfig(**config)).fetch(spec, spec.file).read_bytes() == b"cache"
    missing = WeightsStore(WeightsConfig(paths={spec.name: tmp_path / "nope.pth"}, **config))
    with pytest.raises(WeightsUnavailable, match="no such file"):
        missing.fetch(spec, spec.file)


def test_state_dict_layouts_and_refusal_of_pickled_code(tmp_path):
    tensor = torch.ones(2)
    torch.save({"params_ema": {"a": tensor}, "params": {"a": tensor * 0}}, tmp_path / "ema.pth")
    torch.save({"module.a": tensor}, tmp_path / "dp.pth")
    assert torch.equal(read_state_dict(tmp_path / "ema.pth")["a"], tensor)
    assert list(read_state_dict(tmp_path / "dp.pth")) == ["a"]
    torch.save({"params": {"a": tensor}, "hook": Path("x")}, tmp_path / "pickled.pth")  # not a plain tensor dict
    with pytest.raises(WeightsCorrupt):
        read_state_dict(tmp_path / "pickled.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsCorrupt):
        read_state_dict(tmp_path / "junk.pth")


def test_denoise_blend_matches_realesrganer_dni(store, weights_dir):
    from realesrgan import RealESRGANer

    spec = get_spec("realesr-general-x4v3")
    ours = store.state_dict(spec, denoise=0.3)
    theirs = RealESRGANer.dni(None, str(weights_dir / spec.file.filename),
                              str(weights_dir / spec.denoise_twin.filename), [0.3, 0.7])["params"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    with pytest.raises(ValueError):
        blend_state_dicts(ours, ours, 1.5)


def test_weights_cli_lists_and_downloads(tmp_path, weights_dir, server, capsys, monkeypatch):
    from serve_app.weights import cli

    assert cli.main(["--folder", str(weights_dir), "--cache-dir", str(tmp_path), "list"]) == 0
    listing = capsys.readouterr().out
    assert "RealESRGAN_x4plus" in listing and "present" in listing and "missing" in listing
    spec = replace(get_spec("RealESRGAN_x4plus"), file=WeightFile("model.pth", f"{server}/good.pth", PAYLOAD_SHA))
    monkeypatch.setitem(cli.MODELS, spec.name, spec)
    assert cli.main(["--cache-dir", str(tmp_path / "cache"), "download", spec.name]) == 0
    assert (tmp_path / "cache" / "model.pth").read_bytes() == PAYLOAD
    with pytest.raises(SystemExit):
        cli.main(["download", "no-such-model"])
