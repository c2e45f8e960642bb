"""The builder: ``import_path: serve_app.app:build_app`` wires the graph from typed arguments.

Deployment options (replicas, autoscaling, GPU fractions, queues, user_config) live in
serve_config.yaml, which Serve applies on top of what is built here.
"""
from __future__ import annotations

from ray.serve import Application

from serve_app.config import AppArgs
from serve_app.deployments.faces import FaceDeployment
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.preprocess import PreprocessDeployment
from serve_app.deployments.upscaler import UpscalerDeployment
from serve_app.jobs.consumer import consumer_deployment


def build_app(args: dict | AppArgs) -> Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    upscaler = UpscalerDeployment.bind(args)
    faces = FaceDeployment.bind(args)
    preprocess = PreprocessDeployment.bind(args, upscaler, faces)
    # The job consumers take jobs from the broker, not from the ingress: the ingress holds their
    # handle only so that they are part of the graph.
    consumer = consumer_deployment(args).bind(args, preprocess) if args.jobs.broker_url else None
    return Ingress.bind(args, preprocess, upscaler, faces, consumer)
