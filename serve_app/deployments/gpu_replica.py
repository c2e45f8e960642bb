"""What both GPU deployments are: engines loaded once (and retried when weights are missing),
device lanes, a memory cap, and settings applied by ``reconfigure`` without a restart.

A subclass says which engines it offers, which settings rebuild them, and how it applies the
rest; this base holds the order of start-up that matters: the GPU waits set before PyTorch
makes its CUDA context, the engines loaded last, then the start-up heap frozen.
"""
from __future__ import annotations

import logging

import ray

from serve_app.config import AppArgs, RuntimeConfig
from serve_app.deployments.gpu import StepTimes, cap_gpu_memory, gpu_memory, gpu_waits, sleep_while_gpu_works
from serve_app.deployments.heap import freeze_heap, keep_freed_memory
from serve_app.deployments.logs import quiet_client_errors
from serve_app.deployments.models import EngineCache
from serve_app.deployments.threads import Workers
from serve_app.engines.device import resolve_device
from serve_app.weights import WeightsStore

log = logging.getLogger("ray.serve")


class GpuReplica:
    engine_name = "model"  # for the log line naming the device

    def __init__(self, args: AppArgs, device_lanes: int = 1):
        keep_freed_memory()
        quiet_client_errors()
        sleep_while_gpu_works()  # before PyTorch makes its CUDA context
        self.args, self.store = args, WeightsStore(args.weights)
        self.runtime = RuntimeConfig()
        self.engines = EngineCache(self._load, retry_interval_s=args.weights.retry_interval_s)
        self.times = StepTimes()
        self.workers = Workers(device_lanes=device_lanes)
        self.device = resolve_device(args.device)
        self.memory_fraction = cap_gpu_memory(self.device, self.runtime.gpu_memory_fraction)

    # ------------------------------------------------------------------ for subclasses
    def _load(self, *key):
        raise NotImplementedError

    def _offered(self) -> list[tuple]:
        """The engine keys this replica loads at start (and after a reload)."""
        raise NotImplementedError

    def _engine_settings(self, runtime: RuntimeConfig) -> tuple:
        """The settings its engines are built with: a change reloads them."""
        raise NotImplementedError

    def _apply(self, runtime: RuntimeConfig) -> None:
        """Apply the settings that need no reload (batch sizes, waits)."""

    # ------------------------------------------------------------------ shared
    def _start(self) -> None:
        """The end of a subclass's constructor: load what is offered, then freeze the heap."""
        log.info("%s deployment on %s", self.engine_name, self.device)
        self.engines.preload(self._offered())
        freeze_heap()

    def reconfigure(self, user_config: dict) -> None:
        runtime = RuntimeConfig.model_validate(user_config)
        reload = self._engine_settings(runtime) != self._engine_settings(self.runtime)
        self.runtime = runtime
        self.memory_fraction = cap_gpu_memory(self.device, runtime.gpu_memory_fraction)
        self._apply(runtime)
        if reload:  # engines hold their number format, compiled kernels and graphs
            self.engines.clear()
            self._start()

    def _replica_stats(self) -> dict:
        """What every GPU replica reports in ``stats()``."""
        self.engines.start_retries()
        return {"device": str(self.device), "failures": self.engines.failures,
                "node_id": ray.get_runtime_context().get_node_id(), "times": self.times.summary(),
                "gpu_memory": gpu_memory(self.device, self.memory_fraction), "gpu_waits": gpu_waits(),
                "runtime": self.runtime.model_dump(mode="json")}
