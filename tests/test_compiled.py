"""torch.compile of full tiles: same pictures as eager, and kernels reused after a restart."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import torch
from skimage import data
from torch._dynamo.utils import counters as dynamo_counters

from conftest import restore_with
from serve_app.config import EngineConfig, TileConfig, WeightsConfig
from serve_app.cpu.tiles import TilePlanner
from serve_app.engines.compiled import normal_tensor, with_normal_result
from serve_app.engines.local import LocalNetworks
from serve_app.weights import WeightsStore

TILE = TileConfig(size=64, pad=8, blend=4, batch_size=2)

# Run in a fresh process with an empty inductor cache: only the saved artifacts can spare it the compile.
RESTART = """
import json, sys, numpy as np, torch
from serve_app.config import EngineConfig, TileConfig, WeightsConfig
from serve_app.engines.upscaler import load_upscaler
from serve_app.weights import WeightsStore
store = WeightsStore(WeightsConfig(folder=sys.argv[4], cache_dir=sys.argv[1], download=False))
engine = load_upscaler(sys.argv[5], store, EngineConfig(device="cpu", compile="on",
                       tile=TileConfig(size=64, pad=8, blend=4, batch_size=2)))
tiles = np.load(sys.argv[2])
np.save(sys.argv[3], engine.forward(tiles))
print(json.dumps(dict(torch._dynamo.utils.counters["inductor"])))
"""


def _psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def test_compiled_matches_eager_on_a_photo_and_a_restart_reuses_its_kernels(store, tmp_path):
    # The service's compiled path (CompiledNetwork at the tile shape, 8-bit tiles in) through the
    # one orchestration of a request. realesr-animevideov3 compiles in seconds on a CPU where
    # RealESRGAN_x4plus takes minutes; CompiledNetwork does not depend on the network.
    model = "realesr-animevideov3"
    cached = WeightsStore(WeightsConfig(folder=store.config.folder, cache_dir=tmp_path, download=False))
    eager = LocalNetworks(cached, EngineConfig(device="cpu", compile="off", tile=TILE))
    compiled = LocalNetworks(cached, EngineConfig(device="cpu", compile="on", tile=TILE))
    compiled.upscaler(model)
    photo = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (112, 112), interpolation=cv2.INTER_AREA)
    job = TilePlanner(4, TILE).prepare(photo)
    assert len(job.inputs()) % 2 == 1  # a batch of one goes through the padded path too
    compiled_before = dict(dynamo_counters["stats"])
    ours = restore_with(compiled, photo, model=model).pixels
    reference = restore_with(eager, photo, model=model).pixels
    assert dict(dynamo_counters["stats"]) == compiled_before  # compiled at load; the calls compile nothing more
    psnr = _psnr(ours, reference)
    print(f"compiled vs eager fp32 on the photo: {psnr:.1f} dB")
    assert psnr >= 50  # an RMS error under 0.8 of one level

    artifacts = list((tmp_path / "compiled").iterdir())
    assert [p.name.startswith(f"{model}-64-float32-cpu-torch") for p in artifacts] == [True]
    tiles = np.stack(job.inputs()[:2])
    np.save(tmp_path / "tiles.npy", tiles)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-inductor-cache")}
    done = subprocess.run([sys.executable, "-c", RESTART, str(tmp_path), str(tmp_path / "tiles.npy"),
                           str(tmp_path / "out.npy"), str(store.config.folder), model],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    counters = json.loads(done.stdout.strip().splitlines()[-1])
    assert counters.get("fxgraph_cache_hit", 0) >= 1 and counters.get("fxgraph_cache_miss", 0) == 0, counters
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), compiled.upscaler(model).forward(tiles), atol=1e-5)


def _small_network_compiled(tmp_path, max_batch: int):
    """A small real upscaler on this machine's device, and its CompiledNetwork."""
    import torch
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    from serve_app.engines.compiled import CompiledNetwork
    from serve_app.engines.device import resolve_device

    device = resolve_device("auto")
    torch.manual_seed(0)
    network = SRVGGNetCompact(num_feat=16, num_conv=4, upscale=4, act_type="prelu").eval().to(device)
    compiled = CompiledNetwork(network, size=32, max_batch=max_batch, device=device, dtype=torch.float32,
                               memory_format=torch.contiguous_format, artifacts=tmp_path / "compiled.bin")
    return network, compiled, device


def test_every_batch_size_up_to_the_cap_gives_the_networks_answer(tmp_path):
    # On CUDA each batch size is a captured CUDA graph; on the CPU a batch of one is padded to
    # two. Either way a call must answer as the network does, batch after batch.
    import torch

    network, compiled, device = _small_network_compiled(tmp_path, max_batch=3)
    assert sorted(compiled._graphs) == ([1, 2, 3] if device.type == "cuda" else [])
    with torch.inference_mode():
        for batch in (3, 1, 2, 1, 3):  # every size, in an order that reuses the shared graph memory
            x = torch.rand(batch, 3, 32, 32, device=device)
            torch.testing.assert_close(compiled(x).clone(), network(x), atol=2e-3, rtol=0)
        odd = torch.rand(2, 3, 24, 32, device=device)  # another shape runs eager
        torch.testing.assert_close(compiled(odd), network(odd))


def test_a_network_compiled_for_one_item_runs_a_batch_item_by_item(tmp_path):
    # max_batch=1: one static compile (one CUDA graph); each result is copied out before the
    # next item's call reuses the output buffer.
    import torch

    network, compiled, device = _small_network_compiled(tmp_path, max_batch=1)
    assert sorted(compiled._graphs) == ([1] if device.type == "cuda" else [])
    with torch.inference_mode():
        x = torch.rand(3, 3, 32, 32, device=device)
        ours = compiled(x)
        torch.testing.assert_close(ours, network(x), atol=2e-3, rtol=0)
        assert ours[0].abs().sum() != ours[2].abs().sum()  # three answers, not one repeated


def test_inputs_made_in_inference_mode_reach_the_network_as_compiled_for():
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(len(example_inputs))
        return graph_module.forward

    network = torch.compile(lambda x: torch.relu(x * 2 - 1), backend=counting_backend)
    prepare = lambda x: x.float().div_(255)  # noqa: E731  (the upscaler's 8-bit conversion)
    pixels = torch.arange(48, dtype=torch.uint8).reshape(1, 3, 4, 4)
    example = torch.zeros(1, 3, 4, 4)  # a normal tensor, as CompiledNetwork compiles for
    with torch.inference_mode():
        network(example)
        prepared = with_normal_result(prepare)(pixels)
        assert not prepared.is_inference()
        expected = torch.relu(pixels.float() / 255 * 2 - 1)
        assert torch.equal(network(prepared), expected)
        assert torch.equal(network(normal_tensor(prepare(pixels))), expected)
        assert len(compiles) == 1  # both passed the first compile's guards
        network(prepare(pixels))  # a tensor made in inference mode: compiled again
        assert len(compiles) == 2
