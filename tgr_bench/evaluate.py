"""Transfer evaluation: predictions of a target on stored 8-bit images, and the paper's metrics."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Top-1 classes for (N,3,H,W) uint8 images, computed in inference mode, returned on CPU."""
    preds = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(device, non_blocking=True)
            preds.append(model(chunk.float().div_(255.0)).argmax(dim=1))
            if on_batch is not None:
                on_batch(len(chunk))
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.int64)


def metrics(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor) -> dict:
    """Percentages as in protocol.md: success over all images (clean mistakes count as
    successes, as in the paper), clean accuracy, and success over the clean-correct images."""
    n = len(labels)
    correct = clean_pred == labels
    fooled = adv_pred != labels
    n_correct = int(correct.sum())
    return {
        "n": n,
        "asr": 100.0 * float(fooled.float().mean()) if n else math.nan,
        "clean_acc": 100.0 * n_correct / n if n else math.nan,
        "asr_on_correct": 100.0 * float(fooled[correct].float().mean()) if n_correct else math.nan,
        "n_fooled": int(fooled.sum()),
        "n_clean_correct": n_correct,
        "n_fooled_on_correct": int((fooled & correct).sum()),
    }
