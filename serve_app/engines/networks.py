"""Build a registry model's network and load its weights through the weights store."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from serve_app.weights.registry import ModelSpec
from serve_app.weights.store import WeightsStore


def _rrdbnet(params, device):
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet(**params)


def _srvgg(params, device):
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return SRVGGNetCompact(**params)


def _gfpgan_clean(params, device):
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    return GFPGANv1Clean(**params)


def _restoreformer(params, device):
    from gfpgan.archs.restoreformer_arch import RestoreFormer

    return RestoreFormer(**params)


def _retinaface(params, device):
    from facexlib.detection.retinaface import RetinaFace

    # RetinaFace keeps its mean and priors on the device given at construction.
    return RetinaFace(half=False, device=device, **params)


def _parsenet(params, device):
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(**params)


ARCHITECTURES: dict[str, Callable[[dict, torch.device], nn.Module]] = {
    "RRDBNet": _rrdbnet,
    "SRVGGNetCompact": _srvgg,
    "GFPGANv1Clean": _gfpgan_clean,
    "RestoreFormer": _restoreformer,
    "RetinaFace": _retinaface,
    "ParseNet": _parsenet,
}


def build_network(spec: ModelSpec, device: torch.device | str = "cpu") -> nn.Module:
    """The architecture of ``spec`` with its initial (random) parameters."""
    return ARCHITECTURES[spec.arch](dict(spec.params), torch.device(device))


def load_network(
    spec: ModelSpec,
    store: WeightsStore,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    denoise: float | None = None,
) -> nn.Module:
    """``spec``'s network with its weights from ``store``, in eval mode on ``device``."""
    network = build_network(spec, device)
    network.load_state_dict(store.state_dict(spec, denoise=denoise), strict=True)
    return network.eval().to(device=device, dtype=dtype).requires_grad_(False)
