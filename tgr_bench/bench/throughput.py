"""Benchmark the pipeline: crafting images/s per attack, the tgr/mi cost ratio, peak memory,
evaluation images/s per target, and how the opt-in precision modes change the smoke results.

Usage:
    python scripts/bench.py --source vit_base --attacks mi,tgr --batch-size 8 --device cpu
    python scripts/bench.py --source vit_base --batch-size 64 --device cuda --steps 10 \
        --targets vit_base,inc_v3,pit_b --eval-images 256 --json bench.json
    python scripts/bench.py --source test_vit --targets test_convnext --precision-check
    python scripts/bench.py --no-crafting --io --io-images 1000    # image I/O and a whole run
    python scripts/bench.py --attacks mi,mi/si,mi/admix,mi/di/ti   # the modifiers' cost over MI

Weights are random (speed does not depend on them); `--source` and `--targets` are keys of
conf/source/ or timm model names. Each timing is the median of `--reps` repetitions after
`--warmup` untimed ones. The JSON (stdout, and `--json FILE`) is one object; `tgr_over_mi` is
the ratio of seconds per image. `--precision-check` runs the offline smoke experiment in fp32,
tf32 and bf16 and reports how many PNG pixels and success rates differ from fp32.
`--components` also times TGR with one component at a time and reports each one's cost over MI.
`--io` reports the per-image cost of decoding, encoding and checking PNGs, and the wall time and
peak memory of a whole 1-step run on `--io-images` photo-sized images (a fresh process).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from tgr_bench.attacks.architectures import source_family
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
from tgr_bench.images import PNG_COMPRESS_LEVEL, encode_png
from tgr_bench.pixels import inspect_file, read_image
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
    attacks = {name: attack_of(name, args.steps, source_family(spec.arch)) for name in names}
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
    from tgr_bench.config import compose
    from tgr_bench.pipeline import run

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "tf32", "bf16"):
            cfg = compose(
                [
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


def photo_like(folder: Path, n: int, seed: int = 0) -> Path:
    """n 224x224 PNGs about the size of the paper's photos (smooth structure plus fine
    texture, ~125 KiB each) with a labels.csv: a data set for I/O timing."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = ["filename,label"]
    for i in range(n):
        low = torch.rand(1, 3, 16, 16, generator=g)
        img = torch.nn.functional.interpolate(low, size=(224, 224), mode="bicubic")[0]
        img = img + 0.08 * torch.randn(3, 224, 224, generator=g)
        name = f"img_{i:06d}.png"
        (folder / name).write_bytes(encode_png((img.clamp(0, 1) * 255).round().to(torch.uint8)))
        rows.append(f"{name},{i % 1000}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def bench_io(args: argparse.Namespace) -> dict:
    """Per-image cost of decoding a clean PNG, encoding an adversarial one (the saved zlib
    level), and the up-front check (header, checksums, sha256); then the wall time and peak
    memory of a whole `--io-images`-image, 1-step run of MI on the tiny test_vit, as a user
    runs it (a fresh process, import time included)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = photo_like(Path(tmp) / "data", args.io_images)
        files = sorted(folder.glob("*.png"))[:100]
        decoded = [read_image(f) for f in files]
        g = torch.Generator().manual_seed(1)
        adv = [
            (im.int() + 16 * torch.randint(-1, 2, im.shape, generator=g)).clamp(0, 255).byte()
            for im in decoded
        ]

        def per_image(fn, items) -> float:
            t0 = time.perf_counter()
            for item in items:
                fn(item)
            return 1000 * (time.perf_counter() - t0) / len(items)

        result = {
            "decode_ms": per_image(read_image, files),
            "encode_ms": per_image(encode_png, adv),
            "check_ms": per_image(inspect_file, files),
            "png_compress_level": PNG_COMPRESS_LEVEL,
            "adversarial_png_kib": sum(len(encode_png(a)) for a in adv) / len(adv) / 1024,
        }
        run_dir = Path(tmp) / "run"
        args_ = [
            sys.executable, "-m", "tgr_bench", "source=test_vit", "attack=mi",
            "attack.steps=1", "batch_size=64", "targets=none", f"data.root={folder}",
            "cache_dir=null", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(args_, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        result["run_images"] = args.io_images
        result["run_wall_s"] = time.perf_counter() - t0
        result["run_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"io: decode {result['decode_ms']:.2f} ms, encode {result['encode_ms']:.2f} ms, "
        f"check {result['check_ms']:.2f} ms per image; {args.io_images}-image 1-step run: "
        f"{result['run_wall_s']:.1f} s wall, peak {result['run_peak_rss_mb']:.0f} MB"
    )
    return result


def cpu_name() -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("--io", action="store_true", help="per-image I/O cost and a whole-run wall")
    p.add_argument("--io-images", type=int, default=1000, help="images of the --io run")
    p.add_argument("--no-crafting", action="store_true", help="skip the crafting timings")
    p.add_argument("--json", type=Path)
    return p


def _costs(result: dict) -> None:
    craft = result["crafting"]
    if "mi" not in craft:
        return
    mi = craft["mi"]["seconds_per_step"]
    cost = {n: c["seconds_per_step"] / mi for n, c in craft.items() if n != "mi"}
    result["over_mi"] = cost
    if "tgr" in cost:
        result["tgr_over_mi"] = cost["tgr"]
        print(f"tgr/mi cost = {cost['tgr']:.3f} (tgr at {100 / cost['tgr']:.0f}% of mi's images/s)")
    parts = {n.split(":")[1]: v - 1 for n, v in cost.items() if n.startswith("tgr:")}
    if parts:
        result["tgr_component_cost"] = parts
        shown = ", ".join(f"{c} {100 * v:+.1f}%" for c, v in parts.items())
        print(f"tgr per component, over mi: {shown}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    Runtime(device=device, precision=args.precision).apply()
    result: dict = {
        "source": args.source,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "precision": args.precision,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "crafting": {} if args.no_crafting else bench_crafting(args, device),
    }
    _costs(result)
    if args.targets:
        result["evaluation"] = bench_eval(args, device)
    if args.io:
        result["io"] = bench_io(args)
    if args.precision_check:
        result["precision_check"] = precision_check(device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
