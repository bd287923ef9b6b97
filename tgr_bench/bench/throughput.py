"""Benchmark the pipeline: crafting images/s per attack, the tgr/mi cost ratio, peak memory,
evaluation images/s per target, and how the opt-in precision modes change the smoke results.

Usage:
    python scripts/bench.py --source vit_base --attacks mi,tgr --batch-size 8 --device cpu
    python scripts/bench.py --source vit_base --batch-size 64 --device cuda --steps 10 \
        --targets vit_base,inc_v3,pit_b --eval-images 256 --json bench.json
    python scripts/bench.py --source test_vit --targets test_convnext --precision-check

Weights are random (speed does not depend on them); `--source` and `--targets` are keys of
conf/source/ or timm model names. Each timing is the median of `--reps` repetitions after
`--warmup` untimed ones. The JSON (stdout, and `--json FILE`) is one object; `tgr_over_mi` is
the ratio of seconds per image. `--precision-check` runs the offline smoke experiment in fp32,
tf32 and bf16 and reports how many PNG pixels and success rates differ from fp32.
`--components` also times TGR with one component at a time and reports each one's cost over MI.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import pandas as pd
import torch

from tgr_bench.bench.attack_step import attack_of
from tgr_bench.bench.timing import (
    peak_memory_mb,
    random_model,
    reset_peak,
    summary,
    time_attack,
    time_interleaved,
    time_predict,
)
from tgr_bench.data import read_image
from tgr_bench.record import IMAGES_DIR, RESULTS_CSV
from tgr_bench.settings import Runtime


def bench_crafting(args: argparse.Namespace, device: torch.device) -> dict:
    """images/s per attack (repetitions interleaved across attacks), then each one's peak
    memory from one more, untimed, attack."""
    spec, model = random_model(args.source, device, args.precision)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    names = args.attacks.split(",")
    if args.components:
        names += [f"tgr:{c}" for c in ("attn", "qkv", "mlp") if f"tgr:{c}" not in names]
    attacks = {name: attack_of(name, args.steps) for name in names}
    times = time_interleaved(attacks, model, x, y, args.reps, args.warmup)
    out = {}
    for name, attack in attacks.items():
        s = summary(times[name])
        reset_peak(device)
        time_attack(attack, model, x, y, reps=1, warmup=0)
        out[name] = {
            "images_per_s": args.batch_size / s["median"],
            "seconds_per_batch": s,
            "seconds_per_step": s["median"] / args.steps,
            "peak_memory_mb": peak_memory_mb(device),
        }
        o = out[name]
        print(
            f"craft {name:>12}: {o['images_per_s']:8.2f} img/s "
            f"({o['seconds_per_step']:.4f} s/step, peak {o['peak_memory_mb']:.0f} MB)"
        )
    return out


def bench_eval(args: argparse.Namespace, device: torch.device) -> dict:
    out = {}
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (args.eval_images, 3, 224, 224), dtype=torch.uint8, generator=g)
    for name in filter(None, args.targets.split(",")):
        _, model = random_model(name, device, args.precision)
        is_cnn = not any(hasattr(m, "fused_attn") for m in model.modules())
        model.set_speed(args.precision, channels_last=device.type == "cuda" and is_cnn)
        s = summary(
            time_predict(model, images, args.eval_batch_size, device, args.reps, args.warmup)
        )
        out[name] = {"images_per_s": args.eval_images / s["median"], "seconds": s}
        print(f"eval  {name:>12}: {out[name]['images_per_s']:8.1f} img/s")
        del model
    return out


def precision_check(device: torch.device) -> dict:
    """Smoke experiment (TGR on the tiny ViT) in each precision, compared with fp32."""
    from hydra import compose, initialize_config_module

    from tgr_bench.pipeline import run

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "tf32", "bf16"):
            with initialize_config_module("tgr_bench.conf", version_base="1.3"):
                cfg = compose(
                    "config",
                    overrides=[
                        "experiment=smoke",
                        "attack=tgr",
                        "data.n=16",
                        f"precision={precision}",
                        f"device={device}",
                        "cache_dir=null",
                    ],
                )
            out = Path(tmp) / precision
            run(cfg, output_dir=out)
            runs[precision] = (
                torch.stack([read_image(p) for p in sorted((out / IMAGES_DIR).iterdir())]),
                pd.read_csv(out / RESULTS_CSV).set_index("target"),
            )
    base_png, base_res = runs["fp32"]
    report = {}
    for precision, (png, res) in runs.items():
        if precision == "fp32":
            continue
        report[precision] = {
            "pixels_differing_from_fp32": float((png != base_png).float().mean()),
            "asr_minus_fp32": (res.asr - base_res.asr).round(2).to_dict(),
            "asr_on_correct_minus_fp32": (res.asr_on_correct - base_res.asr_on_correct)
            .round(2)
            .fillna(0)
            .to_dict(),
        }
        print(f"{precision}: {report[precision]}")
    return report


def cpu_name() -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", default="vit_base")
    p.add_argument("--attacks", default="mi,tgr")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="attack steps per timed repetition")
    p.add_argument("--targets", default="", help="comma-separated targets for eval timing")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision-check", action="store_true")
    p.add_argument(
        "--components", action="store_true", help="also time TGR with one component at a time"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    Runtime(device=device, precision=args.precision).apply()
    result: dict = {
        "source": args.source,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "precision": args.precision,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "crafting": bench_crafting(args, device),
    }
    craft = result["crafting"]
    if "mi" in craft:
        mi = craft["mi"]["seconds_per_step"]
        cost = {n: c["seconds_per_step"] / mi for n, c in craft.items() if n != "mi"}
        result["over_mi"] = cost
        if "tgr" in cost:
            result["tgr_over_mi"] = cost["tgr"]
            print(
                f"tgr/mi cost = {cost['tgr']:.3f} "
                f"(tgr at {100 / cost['tgr']:.0f}% of mi's images/s)"
            )
        parts = {n.split(":")[1]: v - 1 for n, v in cost.items() if n.startswith("tgr:")}
        if parts:
            result["tgr_component_cost"] = parts
            print(
                "tgr per component, over mi: "
                + ", ".join(f"{c} {100 * v:+.1f}%" for c, v in parts.items())
            )
    if args.targets:
        result["evaluation"] = bench_eval(args, device)
    if args.precision_check:
        result["precision_check"] = precision_check(device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
