"""What both GPU deployments are: engines loaded once (and retried when weights are missing),
device lanes, a memory cap, and settings applied by ``reconfigure`` without a restart.

A subclass says which engines it offers and how it applies the settings of ``user_config``
(none of which rebuilds an engine: what does is a builder argument, ``EngineConfig``); this base holds the order of start-up that matters: the GPU waits set before PyTorch
makes its CUDA context, the engines loaded last, then the start-up heap frozen.
"""
from __future__ import annotations

import logging
import os

import ray
import torch

from serve_app.config import AppArgs, EngineConfig, RuntimeConfig
from serve_app.deployments.gpu import StepTimes, cap_gpu_memory, gpu_memory, gpu_waits, sleep_while_gpu_works
from serve_app.deployments.heap import freeze_heap, keep_freed_memory, memory_usage
from serve_app.deployments.logs import quiet_client_errors
from serve_app.deployments.models import EngineCache
from serve_app.deployments.threads import Workers
from serve_app.engines.device import resolve_device
from serve_app.metrics import observe_batch, set_gpu_memory
from serve_app.weights import WeightsStore

log = logging.getLogger("ray.serve")


class GpuReplica:
    engine_name = "model"  # for the log line naming the device
    stage = "gpu"  # the metrics' name for this replica's deployment

    def __init__(self, args: AppArgs, device_lanes: int = 1):
        keep_freed_memory()
        quiet_client_errors()
        sleep_while_gpu_works()  # before PyTorch makes its CUDA context
        self.args, self.store = args, WeightsStore(args.weights)
        self.runtime = RuntimeConfig()
        self.engines = EngineCache(self._load, retry_interval_s=args.weights.retry_interval_s)
        self.times = StepTimes(self.stage)
        self.workers = Workers(device_lanes=device_lanes)
        self.device = resolve_device(args.device)
        self.memory_fraction = cap_gpu_memory(self.device, self.runtime.gpu_memory_fraction)

    # ------------------------------------------------------------------ for subclasses
    def _load(self, *key):
        raise NotImplementedError

    def _offered(self) -> list[tuple]:
        """The engine keys this replica loads at start (and after a reload)."""
        raise NotImplementedError

    def _apply(self, runtime: RuntimeConfig) -> None:
        """Apply new settings (batch sizes, waits) to what the replica runs."""

    # ------------------------------------------------------------------ shared
    def _start(self) -> None:
        """The end of a subclass's constructor: load what is offered, then freeze the heap."""
        log.info("%s deployment on %s", self.engine_name, self.device)
        self.engines.preload(self._offered())
        freeze_heap()

    def _count_batch(self, step: str, size: int) -> None:
        """A device batch's size, and this replica's GPU memory after it, for the metrics."""
        observe_batch(step, size)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            set_gpu_memory(torch.cuda.memory_allocated(self.device), int((self.memory_fraction or 1.0) * total))
        else:
            set_gpu_memory(0, 0)

    def reconfigure(self, user_config: dict) -> None:
        self.runtime = RuntimeConfig.model_validate(user_config)
        self.memory_fraction = cap_gpu_memory(self.device, self.runtime.gpu_memory_fraction)
        self._apply(self.runtime)

    def _replica_stats(self) -> dict:
        """What every GPU replica reports in ``stats()``."""
        self.engines.start_retries()
        return {"device": str(self.device), "pid": os.getpid(), "failures": self.engines.failures,
                "engine_builds": dict(self.engines.builds),
                "node_id": ray.get_runtime_context().get_node_id(), "times": self.times.summary(),
                "gpu_memory": gpu_memory(self.device, self.memory_fraction), "gpu_waits": gpu_waits(),
                "memory": memory_usage(),
                "engine": self.args.model_dump(mode="json", include=set(EngineConfig.model_fields)),
                "runtime": self.runtime.model_dump(mode="json")}
