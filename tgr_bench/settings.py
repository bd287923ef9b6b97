"""The root keys of a run (device, precision, seed, batch sizes, caches, folders to evaluate),
declared once, and the runtime they resolve to: the device, the batch sizes `auto` stands for,
and the determinism flags. Validated once, then passed down as one object."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tgr_bench.defenses.settings import (
    defense_defaults,
    load_defenses,
    parse_names,
    parse_settings,
    unused_defense_settings,
)
from tgr_bench.errors import UserError
from tgr_bench.schema import AUTO, key

PRECISIONS = ("fp32", "tf32", "bf16")
# First tries of batch_size=auto and eval_batch_size=auto; halved on out-of-memory.
AUTO_BATCH = {"cuda": 128, "cpu": 16}
AUTO_EVAL_BATCH = {"cuda": 256, "cpu": 64}
CACHE_ENV = "TGR_BENCH_CACHE"  # where cache_dir=auto keeps clean predictions, when set


def _adv_dirs(name: str, value: Any) -> tuple[str, ...] | None:
    """adv_dir: one folder, or a non-empty list of them."""
    if value is None:
        return None
    folders = value if isinstance(value, list | tuple) else [value]
    if not folders:
        raise UserError(
            f"{name}=[] lists no folder: give the folder(s) of adversarial PNGs to evaluate "
            f"(adv_dir=<folder> or adv_dir=[a,b]), or leave adv_dir out to craft images."
        )
    bad = [f for f in folders if isinstance(f, bool | dict | list) or f in (None, "")]
    if bad:
        raise UserError(f"{name}={value!r}: each entry must be a folder path.")
    return tuple(str(f) for f in folders)


@dataclass(frozen=True)
class RuntimeSettings:
    """Root keys every tool that attacks takes."""

    seed: int = key(0, low=0, high=2**63 - 1, help="draws of every image derive from it")
    device: str = key("auto", identity=False, help="auto = cuda when available, else cpu")
    batch_size: int = key(
        16,
        low=1,
        auto=True,
        identity=False,
        help="crafting batch (or auto: the largest that fits); results do not depend on it",
    )
    precision: str = key(
        "fp32", options=PRECISIONS, help="fp32 = exact, paper-faithful | tf32 | bf16: speed modes"
    )
    eval_batch_size: int = key(
        64, low=1, auto=True, identity=False, help="or auto: the largest that fits"
    )
    tf2torch_dir: str | None = key(
        None,
        identity=False,
        help="folder of the converted TF-slim weights (tf2torch_*.npy): the paper's CNN and "
        "defended targets",
    )


@dataclass(frozen=True)
class RunSettings(RuntimeSettings):
    """Root keys of `tgr-bench`."""

    adv_dir: tuple[str, ...] | None = key(
        None,
        parse=_adv_dirs,
        help="evaluate existing folders of <clean stem>.png instead of crafting: a path or [a,b]",
    )
    cache_dir: str | None = key(
        AUTO,
        identity=False,
        help=f"clean predictions per target and data; auto = ${CACHE_ENV} or "
        f"~/.cache/tgr-bench; null = off",
    )
    # Input defenses and smoothing: each adds a target `T+<name>` for every target T
    # (tgr_bench/defenses/settings.py, docs/defenses.md).
    defenses: list[str] = key(
        [], parse=parse_names, help="evaluate every target also under these defenses: [jpeg,rp]"
    )
    defense: dict[str, Any] = field(
        default_factory=defense_defaults,
        metadata={"parse": parse_settings, "help": "settings: defense.jpeg.quality=50"},
    )

    def check(self, where: str) -> None:
        # Every selected defense is built once here, so a bad setting or a missing NRP file
        # stops the run before anything is crafted.
        self.load_defenses()
        unused_defense_settings(self.defenses, self.defense)

    def load_defenses(self) -> list[Any]:
        """The defenses of `defenses`, built with their `defense.<name>` settings."""
        return load_defenses(self.defenses, self.defense)


def resolve_device(name: str) -> torch.device:
    if name == AUTO:
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


def resolve_cache(value: str | None) -> str | None:
    """The clean-prediction cache folder `cache_dir` stands for (None: off)."""
    if value is None:
        return None
    folder = os.environ.get(CACHE_ENV, "~/.cache/tgr-bench") if value == AUTO else value
    if Path(folder).expanduser().is_file():
        raise UserError(
            f"cache_dir={value} is a file; pass a folder for the clean-prediction cache "
            f"(it is created if missing), or cache_dir=null for none."
        )
    return folder


@dataclass(frozen=True)
class Runtime:
    """What the runtime keys resolve to on this machine."""

    device: torch.device
    precision: str = "fp32"
    seed: int = 0
    batch_size: int = 16
    eval_batch_size: int = 64
    cache_dir: str | None = None

    @classmethod
    def of(cls, settings: RuntimeSettings) -> Runtime:
        device = resolve_device(settings.device)

        def sized(value: int | str, auto: dict[str, int]) -> int:
            return auto.get(device.type, auto["cpu"]) if value == AUTO else int(value)

        cache = getattr(settings, "cache_dir", None)
        return cls(
            device=device,
            precision=settings.precision,
            seed=settings.seed,
            batch_size=sized(settings.batch_size, AUTO_BATCH),
            eval_batch_size=sized(settings.eval_batch_size, AUTO_EVAL_BATCH),
            cache_dir=resolve_cache(cache),
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
