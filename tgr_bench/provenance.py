"""What a result needs to be reproduced: versions, git commit, device, times."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import tgr_bench


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import hydra
    import numpy
    import PIL
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "tgr_bench": tgr_bench.__version__,
        "hydra": hydra.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }


def git_commit() -> str | None:
    """The commit of the tgr-bench source tree, when it is a git checkout."""
    here = Path(tgr_bench.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{out}-dirty" if dirty else out


def device_info(device: torch.device) -> dict[str, Any]:
    """The machine a result was computed on: for a GPU its model, memory, compute capability,
    CUDA, cuDNN and driver versions; for a CPU its name and threads."""
    info: dict[str, Any] = {
        "type": device.type,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if device.type != "cuda":
        return info | {"name": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads()}  # fmt: skip
    props = torch.cuda.get_device_properties(device)
    return info | {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "cudnn": torch.backends.cudnn.version(),
        "driver": _driver_version(),
    }


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
