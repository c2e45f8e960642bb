"""The builder: ``import_path: serve_app.app:build_app`` wires the graph from typed arguments."""
from __future__ import annotations

import logging

from ray.serve import Application

from serve_app.config import AppArgs
from serve_app.deployments.faces import FaceDeployment
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.preprocess import PreprocessDeployment
from serve_app.deployments.upscaler import UpscalerDeployment

log = logging.getLogger("ray.serve")


def _gpu_fraction(args: AppArgs) -> float:
    if args.gpu_fraction is not None:
        return args.gpu_fraction
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if not gpus:
        import torch

        gpus = torch.cuda.device_count()
    return 0.5 if gpus else 0.0


def build_app(args: dict | AppArgs) -> Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    fraction = _gpu_fraction(args)
    log.info("model deployments ask for %.2f GPU each", fraction)
    # Logical CPU shares small enough that the whole graph fits on a 1-core machine; the work
    # itself uses the cores torch and OpenCV find, whatever Ray reserves.
    gpu = {"num_gpus": fraction, "num_cpus": 0.25}
    cpu = {"num_gpus": 0, "num_cpus": 0.25}
    preprocess = PreprocessDeployment.options(ray_actor_options=cpu).bind(args)
    upscaler = UpscalerDeployment.options(ray_actor_options=gpu).bind(args)
    faces = FaceDeployment.options(ray_actor_options=gpu).bind(args, upscaler)
    ingress = {"num_gpus": 0, "num_cpus": 0.1}
    return Ingress.options(ray_actor_options=ingress).bind(args, preprocess, upscaler, faces)
