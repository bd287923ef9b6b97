"""The GPU proof in one command: crafting throughput per attack and precision, TGR on every
source family at auto batch and at batch 1, the projected paper workload, evaluation throughput
of every paper target, peak memory, determinism across fresh processes, and the versions.

Usage:
    python -m tgr_bench.bench.gpu_check --out gpu_check          # one GPU, about 3-4 minutes
    python -m tgr_bench.bench.gpu_check --out /tmp/q --quick     # same code paths, tiny, CPU

Weights are random (speed and determinism do not depend on them; no network is needed), the
architectures are the paper's. Each timing is the median of `--reps` repetitions after a
warm-up, the device drained around each. Every section is written to `gpu_check.json` and
`gpu_check.md` in `--out` as soon as it is done, and the run stops starting new cases after
`--budget` seconds, so a slow machine still leaves a complete, honest partial report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tgr_bench import provenance
from tgr_bench.attacks import build_attack
from tgr_bench.attacks.architectures import source_family
from tgr_bench.bench.timing import peak_memory_mb, random_model, reset_peak, summary, timed
from tgr_bench.config import compose
from tgr_bench.pixels import TensorPixels
from tgr_bench.predict import predict
from tgr_bench.record import IMAGES_DIR
from tgr_bench.schema import plain
from tgr_bench.settings import AUTO_BATCH, AUTO_EVAL_BATCH, Runtime

ATTACKS = ("mi", "vmi", "sgm", "pna", "tgr", "tgr_patchout")
MODIFIED = ("mi_di_ti", "tgr_di_ti")  # the transfer modifiers' cost, fp32 only (after the rest)
SUCCESSORS = ("att", "gns", "vdc", "fpr", "ll2s")  # the attacks after TGR: cost over MI, fp32
PRECISIONS = ("fp32", "tf32", "bf16")
FAMILIES = ("vit", "deit", "pit", "cait", "visformer")
GOALS = {
    "tgr_at_least_90pct_of_mi_fp32": "TGR >= 90% of MI's images/s on vit_base, fp32",
    "paper_workload_under_30s": "1000 images x 10 steps, TGR, vit_base, fp32: < 30 s crafting",
    "tgr_batch_speedup_at_least_20x": "TGR auto batch vs batch 1 on vit_base: >= 20x",
}


@dataclass(frozen=True)
class Profile:
    """What is measured: the full GPU check, or the same code paths at tiny sizes (--quick)."""

    sources: dict[str, str]  # family -> catalogue key
    targets: str  # targets config group
    steps: int  # attack steps per timed repetition (images/s is for the 10-step attack)
    reps: int
    warmup: int
    batch: int | None  # None: batch_size=auto (start at AUTO_BATCH, halve on OOM)
    eval_images: int
    determinism_images: int
    vmi_samples: int | None = None  # None: the attack's default (20)
    # Per attack, settings that fit the tiny sources (the released block lists, sample counts).
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def main(self) -> str:
        return self.sources["vit"]


FULL = Profile(
    sources={
        "vit": "vit_base",
        "deit": "deit_b",
        "pit": "pit_b",
        "cait": "cait_s24",
        "visformer": "visformer_s",
    },
    targets="paper",
    steps=2,
    reps=3,
    warmup=1,
    batch=None,
    eval_images=512,
    determinism_images=32,
)
QUICK = Profile(
    sources={
        "vit": "test_vit",
        "deit": "test_deit",
        "pit": "test_pit",
        "cait": "test_cait",
        "visformer": "test_visformer",
    },
    targets="smoke",
    steps=1,
    reps=1,
    warmup=0,
    batch=2,
    eval_images=8,
    determinism_images=2,
    vmi_samples=2,
    overrides={
        "gns": {"hfa": {"n": 2}},
        "fpr": {"attn_blocks": ["blocks.0"]},
        "ll2s": {"num_scale": 2, "num_robust_tokens": 8},
    },
)
PAPER_STEPS = 10  # images/s are reported for the paper's 10-step attacks


@dataclass
class Report:
    out: Path
    started: float = field(default_factory=time.monotonic)
    data: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.data))


# ---- measurements ------------------------------------------------------------------------------
def device_info(device: torch.device) -> dict[str, Any]:
    """The run records' device facts, with the versions the check depends on."""
    versions = provenance.versions()
    return provenance.device_info(device) | {k: versions[k] for k in ("python", "timm")}


def _fit(start: int, device: torch.device, fn: Callable[[int], Any]) -> tuple[int, Any]:
    """Run fn(batch), halving the batch on out-of-memory (what batch_size=auto does)."""
    batch = start
    while True:
        try:
            return batch, fn(batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch = max(1, batch // 2)
            torch.cuda.empty_cache()


def _inputs(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, 224, 224, generator=g) * 255).round() / 255
    y = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device), y.to(device)


def craft_case(
    profile: Profile,
    device: torch.device,
    source: str,
    attack_name: str,
    precision: str,
    batch: int | None,
) -> dict[str, Any]:
    """images/s of the 10-step attack (from the median seconds per step), peak memory."""
    Runtime(device=device, precision=precision).apply()
    spec, model = random_model(source, device, precision)
    overrides: dict[str, Any] = {"steps": profile.steps}
    if attack_name == "vmi" and profile.vmi_samples:
        overrides["n_samples"] = profile.vmi_samples
    overrides |= profile.overrides.get(attack_name, {})
    family = source_family(spec.arch)
    attack = build_attack({**preset(attack_name), **overrides}, family, arch=spec.arch)

    def measure(b: int) -> list[float]:
        x, y = _inputs(b, device)
        reset_peak(device)
        seeds = list(range(b))
        with attack.source_context(model):
            return timed(
                lambda: attack.perturb(model, x, y, seeds), device, profile.reps, profile.warmup
            )

    start = batch or AUTO_BATCH.get(device.type, 16)
    used, times = _fit(start, device, measure)
    s = summary(times)
    per_step = s["median"] / profile.steps
    result = {
        "source": source,
        "attack": attack.label,
        "precision": precision,
        "batch": used,
        "seconds_per_step": per_step,
        "images_per_s": used / (per_step * PAPER_STEPS),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "reps": s["reps"],
    }
    model = None  # frees the weights before the next case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def preset(name: str) -> dict[str, Any]:
    """The packaged attack config `name` (presets such as tgr_patchout included)."""
    return plain(compose([f"attack={name}"]).attack)


def eval_case(profile: Profile, device: torch.device, key: str, precision: str) -> dict[str, Any]:
    Runtime(device=device, precision=precision).apply()
    _, model = random_model(key, device, precision)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    is_cnn = not fused
    model.set_speed(precision, channels_last=device.type == "cuda" and is_cnn)
    g = torch.Generator().manual_seed(1)
    shape = (profile.eval_images, 3, 224, 224)
    images = TensorPixels(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g))
    start = AUTO_EVAL_BATCH.get(device.type, 64)
    reset_peak(device)
    times = timed(
        lambda: predict(model, images, start, device), device, profile.reps, profile.warmup
    )
    s = summary(times)
    result = {
        "images_per_s": profile.eval_images / s["median"],
        "eval_batch_size": min(start, profile.eval_images),
        "fused_attention": all(fused) if fused else None,
        "channels_last": model.channels_last,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    model = None  # frees the weights before the next case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def determinism(profile: Profile, device: torch.device, attacks: tuple[str, ...]) -> dict:
    """The same run twice, in fresh processes: byte-identical PNGs? (sha256 of every file)"""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in attacks:
            digests, warnings = [], set()
            for i in range(2):
                run_dir = Path(tmp) / f"{name}_{i}"
                args = [
                    sys.executable,
                    "-m",
                    "tgr_bench",
                    f"source={profile.main}",
                    "source.pretrained=false",
                    f"attack={name}",
                    "data=synthetic",
                    f"data.n={profile.determinism_images}",
                    "targets=none",
                    f"device={device}",
                    f"batch_size={profile.batch or 'auto'}",
                    "cache_dir=null",
                    f"hydra.run.dir={run_dir}",
                ]
                if profile.batch:
                    args.append("attack.steps=2")
                proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    out[name] = {"error": proc.stderr.strip()[-2000:]}
                    break
                warnings |= set(
                    re.findall(
                        r"UserWarning: (.*?does not have a deterministic[^\n]*)", proc.stderr
                    )
                )
                digests.append(
                    {
                        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((run_dir / IMAGES_DIR).glob("*.png"))
                    }
                )
            else:
                a, b = digests
                differing = sorted(k for k in a if a[k] != b.get(k))
                out[name] = {
                    "images": len(a),
                    "identical": not differing and a.keys() == b.keys(),
                    "differing_files": differing,
                    "nondeterministic_ops": sorted(warnings),
                }
    return out


# ---- the check ---------------------------------------------------------------------------------
def goals(data: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    fp32 = data.get("tgr_over_mi", {}).get("fp32")
    if fp32:
        res["tgr_at_least_90pct_of_mi_fp32"] = {"value": round(1 / fp32, 3), "met": 1 / fp32 >= 0.9}
    paper = data.get("paper_workload", {}).get("seconds")
    if paper:
        res["paper_workload_under_30s"] = {"value": round(paper, 1), "met": paper < 30}
    speedup = data.get("families", {}).get("vit", {}).get("batch_speedup")
    if speedup:
        res["tgr_batch_speedup_at_least_20x"] = {"value": round(speedup, 1), "met": speedup >= 20}
    return res


@dataclass
class Check:
    """One GPU check in progress: what it measures, where it writes, the time left."""

    profile: Profile
    device: torch.device
    report: Report
    budget: float

    @property
    def data(self) -> dict[str, Any]:
        return self.report.data

    def within_budget(self, what: str) -> bool:
        if time.monotonic() - self.report.started < self.budget:
            return True
        self.data["skipped"].append(what)
        return False

    def craft(self, source: str, name: str, precision: str, batch: int | None) -> dict[str, Any]:
        return craft_case(self.profile, self.device, source, name, precision, batch)


def _craft_precision(check: Check, precision: str) -> None:
    crafting: dict[str, dict[str, Any]] = check.data.setdefault("crafting", {})
    profile = check.profile
    for name in ATTACKS:
        if check.within_budget(f"crafting {name} {precision}"):
            r = check.craft(profile.main, name, precision, profile.batch)
            crafting.setdefault(name, {})[precision] = r
            print(
                f"craft {name:>12} {precision}: {r['images_per_s']:9.2f} img/s "
                f"(batch {r['batch']}, peak {r['peak_memory_mb']:.0f} MB)",
                flush=True,
            )
    mi, tgr = crafting.get("mi", {}).get(precision), crafting.get("tgr", {}).get(precision)
    if mi and tgr:
        check.data.setdefault("tgr_over_mi", {})[precision] = (
            mi["images_per_s"] / tgr["images_per_s"]
        )
    check.report.save()


def _paper_workload(check: Check) -> None:
    tgr32 = check.data.get("crafting", {}).get("tgr", {}).get("fp32")
    if tgr32:
        check.data["paper_workload"] = {
            "images": 1000,
            "steps": PAPER_STEPS,
            "seconds": 1000 / tgr32["images_per_s"],
            "from": f"tgr fp32 batch {tgr32['batch']} on {check.profile.main}",
        }


def _families(check: Check) -> None:
    families: dict[str, Any] = check.data.setdefault("families", {})
    for family in FAMILIES:
        source = check.profile.sources[family]
        row: dict[str, Any] = {"source": source}
        if check.within_budget(f"tgr on {source} at auto batch"):
            row["auto"] = check.craft(source, "tgr", "fp32", check.profile.batch)
        if check.within_budget(f"tgr on {source} at batch 1"):
            row["batch_1"] = check.craft(source, "tgr", "fp32", 1)
        if "auto" in row and "batch_1" in row:
            row["batch_speedup"] = row["auto"]["images_per_s"] / row["batch_1"]["images_per_s"]
        families[family] = row
        check.report.save()


def _evaluation(check: Check) -> None:
    target_keys = list(compose([f"targets={check.profile.targets}"]).targets)
    evaluation: dict[str, Any] = check.data.setdefault("evaluation", {})
    for key in target_keys:
        if check.within_budget(f"evaluation {key}"):
            evaluation[key] = eval_case(check.profile, check.device, key, "fp32")
            print(f"eval  {key:>18}: {evaluation[key]['images_per_s']:9.1f} img/s", flush=True)
            check.report.save()


def _cost_over_mi(check: Check, names: tuple[str, ...], section: str) -> None:
    """fp32 images/s of `names` and each one's cost over MI (MI's images/s over theirs)."""
    out: dict[str, Any] = check.data.setdefault(section, {})
    mi32 = check.data.get("crafting", {}).get("mi", {}).get("fp32")
    for name in names:
        if check.within_budget(f"crafting {name} fp32"):
            r = check.craft(check.profile.main, name, "fp32", check.profile.batch)
            r["over_mi"] = mi32["images_per_s"] / r["images_per_s"] if mi32 else None
            out[name] = r
            print(f"craft {name:>12} fp32: {r['images_per_s']:9.2f} img/s", flush=True)
            check.report.save()


def run_check(profile: Profile, device: torch.device, out: Path, budget: float) -> dict[str, Any]:
    """Most telling first: fp32 crafting, the families, determinism, evaluation; then the
    opt-in precisions and the modifiers' cost, which the budget may cut."""
    check = Check(profile, device, Report(out), budget)
    data = check.data
    data |= {"device": device_info(device), "profile": "quick" if profile is QUICK else "full"}
    data["skipped"] = []
    check.report.save()
    _craft_precision(check, "fp32")
    _paper_workload(check)
    _families(check)
    if check.within_budget("determinism"):
        data["determinism"] = determinism(profile, device, ("tgr", "mi"))
        check.report.save()
    _evaluation(check)
    _cost_over_mi(check, SUCCESSORS, "successors")
    for precision in PRECISIONS[1:]:
        _craft_precision(check, precision)
    _cost_over_mi(check, MODIFIED, "modifiers")
    # The goals are about the paper's models on a GPU; tiny CPU numbers are not judged.
    data["goals"] = goals(data) if profile is FULL else {}
    Runtime(device=device).apply()  # leave the process in the exact default
    check.report.save()
    return data


# ---- the report --------------------------------------------------------------------------------
def _header(d: dict[str, Any]) -> list[str]:
    dev = d.get("device", {})
    return [
        f"# GPU check: {dev.get('name')} ({d.get('profile')})",
        "",
        f"torch {dev.get('torch')}, CUDA {dev.get('cuda')}, driver {dev.get('driver')}, "
        f"timm {dev.get('timm')}, cuDNN {dev.get('cudnn')}; {d.get('elapsed_s')} s in all.",
    ]


def _crafting_section(d: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Crafting (images/s of the 10-step attack, batch, peak memory MB; on a CPU the peak "
        "resident set of the process)",
        "",
        "| attack | " + " | ".join(PRECISIONS) + " |",
        "|---|" + "---|" * len(PRECISIONS),
    ]
    for name, per in d.get("crafting", {}).items():
        cells = [
            f"{r['images_per_s']:.1f} (b{r['batch']}, {r['peak_memory_mb']:.0f} MB)"
            if (r := per.get(p))
            else "-"
            for p in PRECISIONS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratios = d.get("tgr_over_mi", {})
    if ratios:
        text = ", ".join(f"{p} {v:.3f}" for p, v in ratios.items())
        lines += ["", f"tgr/mi (seconds per image): {text}"]
    if "paper_workload" in d:
        w = d["paper_workload"]
        lines += [
            "",
            f"Paper workload (1000 images x 10 steps, TGR, fp32): {w['seconds']:.1f} s "
            f"projected ({w['from']}).",
        ]
    return lines


def _families_section(d: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## TGR per source family (fp32)",
        "",
        "| family | source | auto: images/s (batch) | batch 1: images/s | speedup |",
        "|---|---|---|---|---|",
    ]
    for fam, row in d.get("families", {}).items():
        auto, one = row.get("auto"), row.get("batch_1")
        cells = [
            f"{auto['images_per_s']:.1f} ({auto['batch']})" if auto else "-",
            f"{one['images_per_s']:.2f}" if one else "-",
            f"{row['batch_speedup']:.1f}x" if "batch_speedup" in row else "-",
        ]
        lines.append(f"| {fam} | {row['source']} | " + " | ".join(cells) + " |")
    return lines


def _evaluation_section(d: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Evaluation (fp32, inference mode)",
        "",
        "| target | images/s | fused attention | channels-last | peak MB |",
        "|---|---|---|---|---|",
    ]
    for key, r in d.get("evaluation", {}).items():
        lines.append(
            f"| {key} | {r['images_per_s']:.1f} | {r['fused_attention']} | "
            f"{r['channels_last']} | {r['peak_memory_mb']:.0f} |"
        )
    return lines


def _cost_section(d: dict[str, Any], section: str, title: str) -> list[str]:
    if not d.get(section):
        return []
    lines = [
        "",
        f"## {title} (fp32; cost = MI's images/s over the attack's)",
        "",
        "| attack | images/s | x MI | batch | peak MB |",
        "|---|---|---|---|---|",
    ]
    for name, r in d[section].items():
        over = "-" if r["over_mi"] is None else f"{r['over_mi']:.2f}"
        lines.append(
            f"| {name} | {r['images_per_s']:.2f} | {over} | {r['batch']} | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    return lines


def _determinism_section(d: dict[str, Any]) -> list[str]:
    if "determinism" not in d:
        return []
    lines = ["", "## Determinism (the same run twice, fresh processes)", ""]
    for name, r in d["determinism"].items():
        if "error" in r:
            lines.append(f"- {name}: run failed: {r['error'][-300:]}")
            continue
        why = "; ".join(r["nondeterministic_ops"]) or "no non-deterministic op reported"
        lines.append(
            f"- {name}: {r['images']} PNGs, byte-identical: {r['identical']}"
            + ("" if r["identical"] else f" ({len(r['differing_files'])} differ; {why})")
        )
    return lines


def _goals_section(d: dict[str, Any]) -> list[str]:
    lines = []
    if d.get("goals"):
        lines += ["", "## Goals", ""]
        for key, g in d["goals"].items():
            lines.append(f"- {GOALS[key]}: {g['value']} -> {'met' if g['met'] else 'NOT met'}")
    if d.get("skipped"):
        lines += ["", "Skipped (time budget): " + ", ".join(d["skipped"])]
    return lines


def markdown(d: dict[str, Any]) -> str:
    lines = [
        *_header(d),
        *_crafting_section(d),
        *_families_section(d),
        *_evaluation_section(d),
        *_cost_section(d, "successors", "The attacks after TGR"),
        *_cost_section(d, "modifiers", "Transfer modifiers"),
        *_determinism_section(d),
        *_goals_section(d),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tgr_bench.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.json/.md"
    )
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU (< 60 s)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--budget", type=float, default=None, help="seconds before new cases stop")
    args = p.parse_args(argv)
    profile = QUICK if args.quick else FULL
    device = torch.device(
        args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    )
    if not args.quick and device.type != "cuda":
        p.error("the full check needs a CUDA GPU; use --quick on a CPU")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: never reach for the network
    budget = args.budget or (50.0 if args.quick else 250.0)
    data = run_check(profile, device, args.out, budget)
    print(markdown(data))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
