"""Predictions of a model on stored 8-bit images, batch by batch on the device: what
evaluation, the smoke run's labels and least-likely aims share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
    defense: Any = None,
    keys: Sequence[int] | None = None,
) -> torch.Tensor:
    """Top-1 ImageNet class of every image of `pixels` (decoded batch by batch, ahead of the
    device), computed in inference mode, returned on CPU: argmax of the logits minus the
    model's label_offset, so a TF-slim network's background logit predicts -1, a wrong answer.
    `rank="least"`: the least likely of the 1000 ImageNet classes instead (the background
    logit excluded). A batch that runs out of GPU memory is retried in halves (what
    `eval_batch_size=auto` relies on).

    `defense` (tgr_bench.defenses) acts on each decoded batch before the model: an input
    defense transforms the [0,1] pixels, smoothing replaces the argmax by its PREDICT (-1 where
    it abstains); `keys` holds one integer key per image of `pixels` for the randomized ones."""
    offset = int(getattr(model, "label_offset", 0))

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if rank == "least":
            return logits[:, offset:].argmin(dim=1)
        return logits.argmax(dim=1) - offset

    preds = []
    device = torch.device(device)
    pin = device.type == "cuda"
    with torch.inference_mode():
        for idx, decoded in batches(pixels, range(len(pixels)), batch_size):
            start = 0
            while start < len(decoded):
                part = decoded[start : start + batch_size]
                x = (part.pin_memory() if pin else part).to(device, non_blocking=True)
                part_keys = _keys_of(keys, idx[start : start + len(part)])
                try:
                    preds.append(_defended(model, x.float().div_(255.0), defense, part_keys, pick))
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


def _keys_of(keys: Sequence[int] | None, idx: list[int]) -> list[int] | None:
    return None if keys is None else [int(keys[i]) for i in idx]


def _defended(
    model: nn.Module,
    x: torch.Tensor,
    defense: Any,
    keys: list[int] | None,
    pick: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The predictions of one batch of [0,1] pixels, through `defense` when there is one."""
    if defense is None:
        return pick(model(x))
    if hasattr(defense, "predict"):  # smoothing: a prediction rule of its own
        return defense.predict(model, x, keys).to(x.device)
    return pick(model(defense(x, keys)))
