"""PatchOut (Wei et al., AAAI 2022): each iteration perturbs only a random subset of patches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tgr_bench.errors import UserError
from tgr_bench.schema import key

MASK_MODES = ("per_image", "step")


@dataclass(frozen=True)
class PatchOut:
    enabled: bool = key(False)
    n_patches: int = key(
        130, low=1, help="patches perturbed per step, of the 14x14 grid of 16x16 patches"
    )
    patch_size: int = key(16, low=1)
    l2: float = key(0.0, low=0, help="lambda of the per-image ||delta_i||_2 term added to the loss")
    mask: str = key(
        "per_image",
        options=MASK_MODES,
        help="per_image: from each image's seed | step: one mask per step for all images",
    )

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
