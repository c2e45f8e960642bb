"""GPU deployment of the face networks: detect, then restore and parse, each batched across requests.

Under load a face replica answers many requests at once, so every network step batches: the
detector over same-size pictures, GFPGAN and the parser over the faces of every waiting request
(on CUDA these two run compiled, face by face, so each face goes back to its request as soon as
it is done; the paste masks are made there too).
The two steps run in two device lanes (threads with CUDA streams of their own), so the next
pictures are searched for faces while the last faces are restored. Aligning the faces is CPU
work on this replica's small pool; pasting them back, and the background, are the CPU
deployment's work.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable, Hashable

import numpy as np
from ray import serve

from serve_app.config import AppArgs, RuntimeConfig
from serve_app.cpu.paste import FoundFaces
from serve_app.deployments.batching import Abandoned, Deliver, DeviceBatcher, group_indices
from serve_app.deployments.gpu_replica import GpuReplica
from serve_app.engines.faces import FaceEngine, load_face_engine
from serve_app.errors import RequestTimeout

_DETECT, _RESTORE = 0, 1  # the device lanes


@serve.deployment
class FaceDeployment(GpuReplica):
    engine_name, stage = "GFPGAN", "faces"

    def __init__(self, args: AppArgs):
        super().__init__(args, device_lanes=2)
        self.batch_sizes: dict[str, Counter[int]] = {"detect": Counter(), "restore": Counter()}
        self.detections = DeviceBatcher(self._detect_batch, self.runtime.face_batch_size,
                                        self.runtime.face_batch_wait_s)
        self.faces = DeviceBatcher(self._restore_batch, self.runtime.face_batch_size, self.runtime.face_batch_wait_s)
        self._start()

    def _load(self, name: str) -> FaceEngine:
        args = self.args
        return load_face_engine(name, self.store, args, detect_graphs=args.face_detect_graphs,
                                detect_graph_pixels=args.face_detect_graph_pixels,
                                detect_first_sight_pixels=args.face_detect_batch_pixels,
                                share_with=self.engines.any_loaded())

    def _offered(self) -> list[tuple]:
        return [(name,) for name in self.args.face_models]

    def _apply(self, runtime: RuntimeConfig) -> None:
        for batcher in (self.detections, self.faces):
            batcher.max_batch_size, batcher.wait_s = runtime.face_batch_size, runtime.face_batch_wait_s

    async def restore(self, work: np.ndarray, face_model: str, strength: float = 1.0,
                      only_center_face: bool = False, aligned: bool = False, deadline: float | None = None,
                      party: str | None = None) -> tuple[FoundFaces, list[np.ndarray], list[np.ndarray]]:
        """An 8-bit BGR picture -> where its faces are (the affines that cut them out, and how many
        were found), their restored versions and their paste masks; RequestTimeout past
        ``deadline`` (a ``time.time()``), its faces then dropped from the batches to come. Its
        batch items take turns as one party: ``party`` (a video job's), else this request."""
        self.engines.start_retries()
        self.engines.get(face_model)  # a model that could not load is refused here, before any batch
        timeout = None if deadline is None else deadline - time.time()
        try:
            return await asyncio.wait_for(self._restore(work, face_model, strength, only_center_face, aligned,
                                                        party or object()), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout() from None

    async def _restore(self, work: np.ndarray, face_model: str, strength: float, only_center_face: bool,
                       aligned: bool, party: Hashable) -> tuple[FoundFaces, list[np.ndarray], list[np.ndarray]]:
        entered = time.perf_counter()
        engine = self.engines.get(face_model)
        detect_wait = detect = 0.0
        if aligned:
            found = engine.align(work, None, aligned=True)
        else:
            detections, detect_wait, detect = await self.detections.submit_timed((engine, work), party)
            found = await self.workers.cpu(engine.align, work, detections, only_center_face=only_center_face,
                                           max_faces=self.runtime.limits.max_faces)
        aligned_at = time.perf_counter()
        done = await asyncio.gather(*(self.faces.submit_timed((engine, strength, not aligned, crop), party)
                                      for crop in found.crops))
        # In ms: the waits for a batch to start and the batches' times (the longest, where faces are several)
        self.times.add(detect_wait=detect_wait * 1e3, detect=detect * 1e3,
                       align=(aligned_at - entered - detect_wait - detect) * 1e3,
                       restore_wait=max((w for _, w, _ in done), default=0.0) * 1e3,
                       restore=max((r for _, _, r in done), default=0.0) * 1e3,
                       inside=(time.perf_counter() - entered) * 1e3)
        faces = [face for (face, _), _, _ in done]
        # The crops stay here: pasting needs only where they were cut (768 KB less a face to send).
        placed = FoundFaces(affines=found.affines, faces_detected=found.faces_detected)
        return placed, faces, [] if aligned else [mask for (_, mask), _, _ in done]

    async def _detect_batch(self, items: list[tuple[FaceEngine, np.ndarray]], deliver: Deliver,
                            abandoned: Abandoned) -> None:
        """One detector pass per model over the pictures of every waiting request (the detector
        batches those of one size), at most ``face_detect_batch_pixels`` per pass."""
        self.batch_sizes["detect"][len(items)] += 1
        self._count_batch("detect", len(items))
        for indices in group_indices(items, lambda item: id(item[0])):
            engine = items[indices[0]][0]
            for chunk in _by_pixels(indices, [items[i][1] for i in indices], self.args.face_detect_batch_pixels):
                if abandoned():
                    return
                found = await self.workers.device(engine.detector, [items[i][1] for i in chunk], lane=_DETECT)
                for i, detections in zip(chunk, found):
                    deliver(i, detections)

    async def _restore_batch(self, items: list[tuple[FaceEngine, float, bool, np.ndarray]], deliver: Deliver,
                             abandoned: Abandoned) -> None:
        """GFPGAN, then the parser with the paste masks, per model and strength over the faces of
        every waiting request: in one pass each, or face by face where the networks run so (see
        ``FaceEngine.restore_each``), each face delivered as soon as it is done."""
        self.batch_sizes["restore"][len(items)] += 1
        self._count_batch("restore", len(items))
        loop = asyncio.get_running_loop()
        for indices in group_indices(items, lambda item: (id(item[0]), item[1], item[2])):
            engine, strength, paste, _ = items[indices[0]]

            def done(k: int, face: np.ndarray, mask: np.ndarray | None, indices=indices) -> None:
                loop.call_soon_threadsafe(deliver, indices[k], (face, mask))  # from the device lane

            await self.workers.device(restore_and_mask, engine, [items[i][3] for i in indices], strength, paste,
                                      done, abandoned, lane=_RESTORE)

    async def stats(self) -> dict:
        return {**self._replica_stats(),
                "batch_sizes": {step: dict(sizes) for step, sizes in self.batch_sizes.items()}}

    async def reset_stats(self) -> None:
        """Forget counts and times (the benchmark measures each load level on its own)."""
        for sizes in self.batch_sizes.values():
            sizes.clear()
        self.times.clear()


def restore_and_mask(engine: FaceEngine, crops: list[np.ndarray], strength: float, paste: bool,
                     done: Callable[[int, np.ndarray, np.ndarray | None], None],
                     abandoned: Abandoned = lambda: False) -> None:
    """Restore ``crops`` and make their paste masks (``paste``), calling ``done(k, face, mask)``
    for the k-th crop as soon as its face is ready (see ``FaceEngine.restore_each``); stop once
    nobody waits for the rest."""
    for k, (face, mask) in enumerate(engine.restore_each(crops, strength=strength, masks=paste)):
        done(k, face, mask)
        if abandoned():
            return


def _by_pixels(indices: list[int], pictures: list[np.ndarray], budget: int) -> list[list[int]]:
    """``indices`` in runs whose pictures hold at most ``budget`` pixels together (at least one
    picture a run), so a batch of large photos cannot exhaust the replica's GPU memory."""
    runs: list[list[int]] = []
    total = budget
    for i, picture in zip(indices, pictures):
        pixels = picture.shape[0] * picture.shape[1]
        if total + pixels > budget:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += pixels
    return runs
