"""Runtime settings of one run: device, precision, seed, batch sizes, clean-prediction cache and
the determinism flags. Validated once, then passed down as one object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tgr_bench.errors import UserError

PRECISIONS = ("fp32", "tf32", "bf16")
# First tries of batch_size=auto and eval_batch_size=auto; halved on out-of-memory.
AUTO_BATCH = {"cuda": 128, "cpu": 16}
AUTO_EVAL_BATCH = {"cuda": 256, "cpu": 64}


def resolve_device(name: Any) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError as e:
        raise UserError(
            f"device={name!r} is not a torch device (use auto, cpu, cuda, cuda:1)."
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but torch sees no CUDA GPU; use device=cpu.")
    return device


def positive_int(name: str, value: Any, auto: int | None = None) -> int:
    """A whole number >= 1 (or `auto` when `auto` gives its value)."""
    if value == "auto" and auto is not None:
        return auto
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " or auto" if auto is not None else ""
        raise UserError(f"{name}={value!r}: need a whole number >= 1{hint}.")
    return value


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"
    seed: int = 0
    batch_size: int = 16
    eval_batch_size: int = 64
    cache_dir: str | None = None

    @classmethod
    def from_cfg(cls, cfg: Any) -> Runtime:
        device = resolve_device(cfg.get("device"))
        precision = cfg.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise UserError(f"precision={precision!r}: choose one of {list(PRECISIONS)}.")
        seed = cfg.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise UserError(f"seed={seed!r}: need a whole number in 0..2^63-1.")
        cache_dir = cfg.get("cache_dir")
        if cache_dir is not None and Path(str(cache_dir)).expanduser().is_file():
            raise UserError(
                f"cache_dir={cache_dir} is a file; pass a folder for the clean-prediction cache "
                f"(it is created if missing), or cache_dir=null for none."
            )
        return cls(
            device=device,
            precision=precision,
            seed=seed,
            batch_size=positive_int(
                "batch_size", cfg.get("batch_size", 16), AUTO_BATCH.get(device.type, 16)
            ),
            eval_batch_size=positive_int(
                "eval_batch_size",
                cfg.get("eval_batch_size", 64),
                AUTO_EVAL_BATCH.get(device.type, 64),
            ),
            cache_dir=cfg.get("cache_dir"),
        )

    def apply(self) -> dict[str, Any]:
        """Set the global flags for byte-identical reruns on one device; returns what was set,
        for run.json. fp32 (the default) is exact: no TF32. tf32 and bf16 are opt-in speed
        modes."""
        tf32 = self.precision == "tf32"
        flags: dict[str, Any] = {"precision": self.precision, "tf32": tf32}
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        if self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
            flags.update(
                cudnn_benchmark=False,
                cudnn_deterministic=True,
                use_deterministic_algorithms="warn_only",
                CUBLAS_WORKSPACE_CONFIG=os.environ["CUBLAS_WORKSPACE_CONFIG"],
            )
        torch.manual_seed(self.seed)
        return flags
