"""EngineCache: a model that cannot load is refused at once and retried only in the background."""
import asyncio
import threading

import pytest

from serve_app.config import WeightsConfig
from serve_app.deployments.models import EngineCache
from serve_app.engines.upscaler import load_upscaler
from serve_app.config import EngineConfig
from serve_app.errors import WeightsUnavailable
from serve_app.weights import WeightsStore

from conftest import save_random_checkpoint


def test_a_missing_model_is_built_once_then_refused_at_once_until_a_retry_loads_it(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=tmp_path / "cache", download=False))
    builds = []

    def build(name):
        builds.append(threading.current_thread().name)
        return load_upscaler(name, store, EngineConfig(device="cpu"))

    async def main():
        cache = EngineCache(build, retry_interval_s=0.2)
        for _ in range(20):  # one build; the other 19 refused from memory
            with pytest.raises(WeightsUnavailable, match="realesr-general-x4v3"):
                cache.get("realesr-general-x4v3")
        assert len(builds) == 1 and "realesr-general-x4v3" in cache.failures
        save_random_checkpoint("realesr-general-x4v3", folder)  # the weights arrive
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not cache.failures:
                break
        return cache.get("realesr-general-x4v3")

    engine = asyncio.run(main())
    assert engine.scale == 4 and builds[0] == "MainThread"
    assert all(name.startswith("engine-load") for name in builds[1:])  # retries off the event loop


def test_preload_outside_an_event_loop_retries_once_one_runs(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    store = WeightsStore(WeightsConfig(folder=folder, cache_dir=tmp_path / "cache", download=False))
    cache = EngineCache(lambda name: load_upscaler(name, store, EngineConfig(device="cpu")), retry_interval_s=0.1)
    cache.preload([("realesr-general-x4v3",)])  # a replica's constructor: no loop yet, no raise
    assert "realesr-general-x4v3" in cache.failures
    save_random_checkpoint("realesr-general-x4v3", folder)

    async def main():
        cache.start_retries()  # what the first request or stats call does
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not cache.failures:
                return True
        return False

    assert asyncio.run(main())
