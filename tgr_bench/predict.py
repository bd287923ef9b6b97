"""Predictions of a model on stored 8-bit images, batch by batch on the device: what
evaluation, the smoke run's labels and least-likely aims share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tgr_bench.pixels import Pixels, batches


def predict(
    model: nn.Module,
    pixels: Pixels,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    rank: str = "top",
) -> torch.Tensor:
    """Top-1 ImageNet class of every image of `pixels` (decoded batch by batch, ahead of the
    device), computed in inference mode, returned on CPU: argmax of the logits minus the
    model's label_offset, so a TF-slim network's background logit predicts -1, a wrong answer.
    `rank="least"`: the least likely of the 1000 ImageNet classes instead (the background
    logit excluded). A batch that runs out of GPU memory is retried in halves (what
    `eval_batch_size=auto` relies on)."""
    offset = int(getattr(model, "label_offset", 0))

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if rank == "least":
            return logits[:, offset:].argmin(dim=1)
        return logits.argmax(dim=1) - offset

    preds = []
    device = torch.device(device)
    pin = device.type == "cuda"
    with torch.inference_mode():
        for _, decoded in batches(pixels, range(len(pixels)), batch_size):
            start = 0
            while start < len(decoded):
                part = decoded[start : start + batch_size]
                x = (part.pin_memory() if pin else part).to(device, non_blocking=True)
                try:
                    preds.append(pick(model(x.float().div_(255.0))))
                except torch.cuda.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    torch.cuda.empty_cache()
                    continue
                start += len(part)
                if on_batch is not None:
                    on_batch(len(part))
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.int64)
