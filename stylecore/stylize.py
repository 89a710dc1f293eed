"""One forward pass over a batch of images, bf16 on CUDA (whole buckets go through ``engine.py``)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .model import UNet


def autocast_for(device: torch.device):
    """bf16 (or fp16 where bf16 is missing) autocast on CUDA; nothing on CPU, where bf16 is very slow."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.inference_mode()
def stylize_batch(model: UNet, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 or [0, 1] float images, on the model's device, to uint8 stylised images on the same device."""
    device = next(model.parameters()).device
    batch = images.to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        batch = batch.float().div_(255)
    with autocast_for(device):
        output = model(batch)
    return output.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)
