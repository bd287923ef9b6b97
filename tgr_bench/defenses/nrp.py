"""NRP, the Neural Representation Purifier (Naseer et al., CVPR 2020): a network trained to map
adversarial images back to clean ones, applied to the stored images before the target model.

The network is the published `NRP.pth` purifier: a 3x3 convolution to 64 channels, 23
residual-in-residual dense blocks (growth 32), and a 3x3 convolution to 3 channels, with no skip
connection from the input. Its module names are those of the published state dict
(`conv_first`, `RRDB_trunk.<i>.RDB<j>.conv<k>`, `trunk_conv`), so the file loads as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.attacks.draws import mix
from tgr_bench.defenses.base import InputDefense, check_images, in_range, need_keys
from tgr_bench.errors import UserError
from tgr_bench.hashing import sha256_file
from tgr_bench.models import read_state_dict

NRP_TAG = 0x4E5250  # keeps NRP's noise apart from the attacks' and the other defenses' draws
WEIGHTS_SOURCE = "NRP.pth, published with github.com/Muzammal-Naseer/NRP ('Pretrained Purifiers')"


class DenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing the input and every earlier output; the result is
    scaled by 0.2 and added to the input."""

    def __init__(self, nf: int = 64, gc: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2, inplace=True))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three dense blocks in a row, scaled by 0.2 and added to the block's input."""

    def __init__(self, nf: int = 64, gc: int = 32) -> None:
        super().__init__()
        self.RDB1 = DenseBlock(nf, gc)
        self.RDB2 = DenseBlock(nf, gc)
        self.RDB3 = DenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class Purifier(nn.Module):
    """The NRP network: pixels (B,3,H,W) to purified pixels of the same size, unclamped. The
    defaults are the published file's (64 features, 23 blocks, growth 32)."""

    def __init__(self, nf: int = 64, nb: int = 23, gc: int = 32) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.trunk_conv = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_conv(self.RRDB_trunk(self.conv_first(x)))


def read_purifier(path: str | os.PathLike[str]) -> Purifier:
    """The purifier in `path` (.pth/.pt read with weights_only=True, or .safetensors), with
    exactly the keys of its layout; its size (features, blocks, growth) is read from the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(
            f"NRP weights not found: {file}. Download {WEIGHTS_SOURCE} and pass its path."
        )
    state = read_state_dict(str(file))
    net = Purifier(*_size_of(state))
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise UserError(f"{file} does not fit the NRP purifier: {_last_line(e)}") from e
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise UserError(
            f"{file} is not in the layout of NRP.pth: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}.{_hint(state)} "
            f"Use {WEIGHTS_SOURCE}."
        )
    return net.eval()


def _size_of(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(features, blocks, growth) of a state dict in the published layout; the published
    sizes when the keys that tell them are absent (the key check then says what is wrong)."""
    first = state.get("conv_first.weight")
    growth = state.get("RRDB_trunk.0.RDB1.conv1.weight")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"RRDB_trunk\.(\d+)\.", k))}
    if first is None or growth is None or first.dim() != 4 or growth.dim() != 4:
        return 64, 23, 32
    return int(first.shape[0]), max(blocks) + 1, int(growth.shape[0])


def _hint(state: dict[str, torch.Tensor]) -> str:
    if "recon_trunk.0.conv1.weight" in state:
        return " It looks like NRP_resG.pth, the ResNet purifier; tgr-bench uses NRP.pth."
    return ""


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


@dataclass(frozen=True, eq=False)
class NRP(InputDefense):
    """Each image through the purifier, clamped to [0,1] and rounded to the 8-bit grid (the
    released `purify.py` saved its outputs as 8-bit PNGs).

    With `dynamic` (the default, as the released `purify.py --dynamic` and the TransferAttack
    benchmark run it), each image first gets Gaussian noise of standard deviation `sigma` = 0.05,
    projected to the L-inf ball of radius `eps` = 16/255 around it and clipped to [0,1]: the
    noise is drawn by a torch.Generator seeded from the image's own key, on the host, so it
    depends on neither the batch nor the device. One pass, no iterations.

    The purifier is read from `weights` (NRP.pth), or given built as `purifier`; it moves to the
    images' device on first use."""

    weights: str | None = None
    dynamic: bool = True
    eps: float = 16 / 255
    sigma: float = 0.05
    purifier: nn.Module | None = field(default=None, repr=False)

    name: ClassVar[str] = "nrp"
    reference: ClassVar[str] = (
        "NRP: Naseer et al., A Self-supervised Approach for Adversarial Robustness, CVPR 2020 "
        "(purifier NRP.pth; dynamic inference: N(0, 0.05^2) noise within 16/255)"
    )

    def __post_init__(self) -> None:
        in_range("defense.nrp.eps", self.eps, 0.0, 1.0, "the noise bound (released: 16/255)")
        in_range("defense.nrp.sigma", self.sigma, 0.0, 1.0, "the noise scale (released: 0.05)")
        net, sha = self.purifier, None
        if net is None:
            if not self.weights:
                raise UserError(
                    f"defense.nrp needs its weights: pass defense.nrp.weights=<path to NRP.pth> "
                    f"({WEIGHTS_SOURCE})."
                )
            net, sha = read_purifier(self.weights), sha256_file(Path(self.weights).expanduser())
        # Frozen settings; the network and the file's hash are set once, here.
        object.__setattr__(self, "purifier", net.eval().requires_grad_(False))
        object.__setattr__(self, "weights_sha256", sha)

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        """Only dynamic inference draws: without it the clean predictions are seed-free."""
        return self.dynamic

    def params(self) -> dict[str, Any]:
        return {
            "nrp_dynamic": bool(self.dynamic),
            "nrp_eps": float(self.eps),
            "nrp_sigma": float(self.sigma),
            "nrp_weights_sha256": self.weights_sha256,
        }

    def __call__(self, x: torch.Tensor, keys: Sequence[int] | None = None) -> torch.Tensor:
        # Keys are needed only for the noise: without `dynamic` the defense is deterministic.
        check_images(x)
        drawn = need_keys(self.name, keys, len(x)) if self.dynamic else []
        with torch.no_grad():
            return self.apply(x, drawn)

    def apply(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        net = self.purifier.to(x.device)  # in place: a no-op after the first batch
        inputs = self.perturb(x, keys) if self.dynamic else x
        out = net(inputs.float()).clamp_(0, 1)
        return out.mul_(255).round_().div_(255).to(x.dtype)

    def perturb(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        """Dynamic inference's input: x + N(0, sigma^2) per image from its key, projected to
        [x - eps, x + eps] and clipped to [0,1]."""
        noise = torch.stack([self.noise(int(k), x.shape[1:]) for k in keys])
        moved = x + noise.to(x.device, x.dtype)
        return torch.min(torch.max(moved, x - self.eps), x + self.eps).clamp_(0, 1)

    def noise(self, key: int, shape: torch.Size) -> torch.Tensor:
        """One image's noise, drawn on the host from its own generator."""
        generator = torch.Generator().manual_seed(mix(key, NRP_TAG))
        return torch.randn(shape, generator=generator) * self.sigma
