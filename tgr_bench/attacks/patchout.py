"""PatchOut (Wei et al., AAAI 2022): each iteration perturbs only a random subset of patches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tgr_bench.errors import UserError, flag, number

MASK_MODES = ("per_image", "step")


@dataclass(frozen=True)
class PatchOut:
    n_patches: int = 130
    patch_size: int = 16
    l2: float = 0.0  # lambda of the per-image ||delta_i||_2 term added to the loss
    mask: str = "per_image"  # per_image: drawn from each image's seed; step: one mask per step

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any] | None) -> PatchOut | None:
        cfg = dict(cfg or {})
        enabled = flag("attack.patchout.enabled", cfg.pop("enabled", False))
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(
                f"attack.patchout has no keys {sorted(unknown)}; valid: enabled, "
                f"{', '.join(cls.__dataclass_fields__)}."
            )
        p = cls(**cfg)
        if not isinstance(p.n_patches, int) or p.n_patches < 1:
            raise UserError(f"attack.patchout.n_patches={p.n_patches!r}: need an int >= 1.")
        if not isinstance(p.patch_size, int) or p.patch_size < 1:
            raise UserError(f"attack.patchout.patch_size={p.patch_size!r}: need an int >= 1.")
        if number("attack.patchout.l2", p.l2) < 0:
            raise UserError(f"attack.patchout.l2={p.l2}: need lambda >= 0.")
        if p.mask not in MASK_MODES:
            raise UserError(f"attack.patchout.mask={p.mask!r}: choose one of {list(MASK_MODES)}.")
        return p if enabled else None  # checked even when off, like the other modifiers

    def params(self) -> dict[str, Any]:
        return {
            "patchout_n": self.n_patches,
            "patchout_size": self.patch_size,
            "patchout_l2": self.l2,
            "patchout_mask": self.mask,
        }

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise UserError(
                f"attack.patchout.patch_size={self.patch_size} does not tile {height}x{width} "
                f"images."
            )
        gh, gw = height // self.patch_size, width // self.patch_size
        if self.n_patches > gh * gw:
            raise UserError(
                f"attack.patchout.n_patches={self.n_patches} is more than the {gh * gw} patches of "
                f"a {height}x{width} image."
            )
        return gh, gw

    def masks(
        self, shape: torch.Size, step: int, seeds: Sequence[int], device: torch.device
    ) -> torch.Tensor:
        """(B,1,H,W) masks keeping exactly n_patches patches of each image at this step.

        Each image draws from its own generator seeded by its seed (a host int: no device sync),
        so its mask never depends on the rest of its batch.
        """
        b, _, h, w = shape
        gh, gw = self.grid(h, w)
        if self.mask == "step":  # the released TGR+PatchOut: one mask per step for all images
            gen = torch.Generator(device).manual_seed(step)
            scores = torch.rand(gh * gw, generator=gen, device=device).expand(b, -1)
        else:
            rows = []
            for s in seeds:
                gen = torch.Generator(device).manual_seed((s * 1_000_003 + step) % (1 << 62))
                rows.append(torch.rand(gh * gw, generator=gen, device=device))
            scores = torch.stack(rows)
        keep = scores.argsort(dim=1)[:, : self.n_patches]
        flat = torch.zeros(b, gh * gw, device=device).scatter_(1, keep, 1.0)
        grid = flat.view(b, 1, gh, gw)
        return grid.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)
