"""Seconds per attack step for `mi` and `tgr` on one source, and the tgr/mi ratio.

Usage:
    python scripts/bench_attack.py --source vit_base --batch-size 8 --device cpu
    python scripts/bench_attack.py --source vit_base --batch-size 32 --device cuda --reps 10

Weights are random (timing does not depend on them): `--source` is a key of conf/source/
(its architecture, kwargs and input size) or a timm model name. Each repetition runs a full
attack of `--steps` steps on one batch after `--warmup` untimed ones; the median is reported.
TGR's one-off probe (entering its context) is outside the timed region.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tgr_bench.attacks import build_attack
from tgr_bench.models import ModelSpec, Weights, build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def source_spec(name: str) -> ModelSpec:
    path = CONF / "source" / f"{name}.yaml"
    if path.is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        return ModelSpec.from_cfg({**cfg, "pretrained": False, "requires_checkpoint": False})
    return ModelSpec(key=name, model=name, pretrained=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_attack(name: str, model, x, y, steps: int, reps: int, warmup: int) -> list[float]:
    attack = build_attack({"name": name, "steps": steps})
    seeds = list(range(len(x)))
    times = []
    with attack.source_context(model):
        for i in range(warmup + reps):
            sync(x.device)
            t0 = time.perf_counter()
            attack.perturb(model, x, y, seeds)
            sync(x.device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) / steps)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", default="vit_base")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2, help="attack steps per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attacks", default="mi,tgr")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    spec = source_spec(args.source)
    model = build_model(spec, Weights("random"), device).model
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)

    result = {
        "source": args.source, "model": spec.model, "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds_per_step": {},
    }
    for name in args.attacks.split(","):
        times = time_attack(name, model, x, y, args.steps, args.reps, args.warmup)
        result["seconds_per_step"][name] = statistics.median(times)
        print(f"{name:>4}: {statistics.median(times):.4f} s/step (median of {len(times)}; "
              f"min {min(times):.4f}, max {max(times):.4f})")
    sps = result["seconds_per_step"]
    if "mi" in sps and "tgr" in sps:
        result["tgr_over_mi"] = sps["tgr"] / sps["mi"]
        print(f"tgr/mi = {result['tgr_over_mi']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
