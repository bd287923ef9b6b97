"""The Python API for notebooks and other tools: a catalogue model as tgr-bench runs it."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from tgr_bench.catalogue import model_spec
from tgr_bench.models import build_model, resolve_weights


def load_model(
    key: str,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    tf2torch_dir: str | None = None,
) -> nn.Module:
    """The catalogue model `key` (any file of conf/source/: `vit_base`, `inc_v3`, `res_v2_101`,
    `test_vit`, ...) in eval mode, exactly as the CLI builds it.

    It takes RGB pixels in [0,1], shape (B,3,H,W) at any size (resized to the model's input,
    bilinear, align_corners=False, then the model's own normalization) and returns logits
    (B, classes) at every batch size. `label_offset` is 1 for the 1001-class TF-slim networks
    (logit 0 = background: the ImageNet class of logit i is i - 1), else 0. `checkpoint` is a
    local weight file (a timm state dict, or converted TF-slim weights, told apart by content);
    `tf2torch_dir` a folder of converted TF-slim files (see docs/protocol.md section 2).

        from tgr_bench import load_model
        model = load_model("inc_v3", tf2torch_dir="/data/tf2torch")
        logits = model(images)                       # images: (B,3,H,W) in [0,1]
        classes = logits.argmax(1) - model.label_offset
    """
    spec = model_spec(key)
    if checkpoint is not None:
        spec = replace(spec, checkpoint=str(checkpoint))
    return build_model(spec, resolve_weights(spec, tf2torch_dir), device).model
