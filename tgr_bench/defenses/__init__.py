"""Defenses of the targets: input transforms of the stored 8-bit images, and smoothing's PREDICT.

`load_defense(name, **settings)` builds one from DEFENSES; every setting defaults to the paper's
ImageNet value. An input defense is called as `defense(x, keys)`: (B,3,H,W) pixels in [0,1] in,
pixels in [0,1] out (R&P returns its larger canvas), before the target model's own resize and
normalization; the randomized ones (rp, pd) need one integer key per image
(`tgr_bench.crafting.image_seeds`). Smoothing is a prediction rule instead:
`defense.predict(model, x, keys)` returns class indices, -1 where it abstains (smoothing.py says
how to count abstentions). NRP (nrp.py) is an input defense whose purifier comes from the user's
NRP.pth (`load_defense("nrp", weights=...)`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tgr_bench.defenses.base import Defense, InputDefense
from tgr_bench.defenses.jpeg import Jpeg
from tgr_bench.defenses.nrp import NRP
from tgr_bench.defenses.pixel_deflection import ActivationGuide, PixelDeflection
from tgr_bench.defenses.rp import RandomResizePad
from tgr_bench.defenses.smoothing import ABSTAIN, Smoothing
from tgr_bench.defenses.squeeze import BitDepth, Median
from tgr_bench.errors import UserError

DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (Jpeg, BitDepth, Median, RandomResizePad, PixelDeflection, Smoothing, NRP)
}


def load_defense(name: str, **params: Any) -> Defense:
    """The defense `name` with its paper's ImageNet settings, any of them overridden by params."""
    cls = DEFENSES.get(name)
    if cls is None:
        raise UserError(f"Unknown defense {name!r}; available: {', '.join(sorted(DEFENSES))}.")
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UserError(f"defense.{name} has no settings {unknown}; valid: {', '.join(valid)}.")
    return cls(**params)


__all__ = [
    "ABSTAIN",
    "DEFENSES",
    "ActivationGuide",
    "BitDepth",
    "Defense",
    "InputDefense",
    "Jpeg",
    "Median",
    "NRP",
    "PixelDeflection",
    "RandomResizePad",
    "Smoothing",
    "load_defense",
]
