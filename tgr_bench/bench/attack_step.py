"""Seconds per attack step for `mi` and `tgr` on one source, and the tgr/mi ratio.

Usage:
    python scripts/bench_attack.py --source vit_base --batch-size 8 --device cpu
    python scripts/bench_attack.py --source vit_base --batch-size 32 --device cuda --reps 10

Weights are random (timing does not depend on them): `--source` is a key of conf/source/
(its architecture, kwargs and input size) or a timm model name. Each repetition runs a full
attack of `--steps` steps on one batch after `--warmup` untimed ones; the median is reported.
TGR's one-off probe (entering its context) is outside the timed region. scripts/bench.py
measures the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tgr_bench.attacks import build_attack
from tgr_bench.bench.timing import random_model, summary, time_attack


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
    spec, model = random_model(args.source, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)

    result = {
        "source": args.source,
        "model": spec.model,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds_per_step": {},
    }
    for name in args.attacks.split(","):
        attack = build_attack({"name": name, "steps": args.steps})
        times = [t / args.steps for t in time_attack(attack, model, x, y, args.reps, args.warmup)]
        s = summary(times)
        result["seconds_per_step"][name] = s["median"]
        print(
            f"{name:>4}: {s['median']:.4f} s/step (median of {s['reps']}; "
            f"min {s['min']:.4f}, max {s['max']:.4f})"
        )
    sps = result["seconds_per_step"]
    if "mi" in sps and "tgr" in sps:
        result["tgr_over_mi"] = sps["tgr"] / sps["mi"]
        print(f"tgr/mi = {result['tgr_over_mi']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
