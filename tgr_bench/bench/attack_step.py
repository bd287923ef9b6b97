"""Seconds per attack step for several attacks on one source, their repetitions interleaved,
and each one's cost relative to MI.

Usage:
    python -m tgr_bench.bench.attack_step --source vit_base --batch-size 8 --device cpu
    python -m tgr_bench.bench.attack_step --attacks mi,tgr,tgr:attn,tgr:qkv,tgr:mlp --reps 5
    python -m tgr_bench.bench.attack_step --attacks mi --profile-edits --device cpu
    python -m tgr_bench.bench.attack_step --attacks mi,mi/si,mi/admix,mi/di/ti   # modifiers' cost
    python -m tgr_bench.bench.attack_step --attacks mi,ll2s --set ll2s.num_scale=2   # a setting

Weights are random (timing does not depend on them): `--source` is a catalogue key (its
architecture, kwargs and input size) or a timm model name. `tgr:qkv` is TGR with only that
component, for a per-component profile; `mi/si`, `tgr/di/ti` turn modifiers on. Each
repetition runs a full attack of `--steps` steps on one batch; the attacks' repetitions are
interleaved and the median is reported. Probes (entering the attack's context) are not timed.
`python -m tgr_bench.bench.throughput` measures the whole pipeline;
`python -m tgr_bench.bench.gpu_check` is the GPU proof.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from tgr_bench import provenance
from tgr_bench.attacks import MIFGSM, build_attack
from tgr_bench.attacks.architectures import source_family
from tgr_bench.bench.timing import random_model, summary, time_interleaved
from tgr_bench.settings import Runtime


def attack_of(
    name: str, steps: int, family: str | None, settings: dict[str, Any] | None = None
) -> MIFGSM:
    """`tgr`, `tgr:qkv` (TGR with one component) or `mi/si`, `tgr/di/ti` (with modifiers on)
    as an attack of `steps` steps, for a source of `family`, with `settings` (its keys)."""
    first, *modifiers = name.split("/")
    base, _, component = first.partition(":")
    cfg: dict = {"name": base, "steps": steps, **{m: {"enabled": True} for m in modifiers}}
    cfg |= settings or {}
    if component:
        cfg["components"] = component.split("+")
    return build_attack(cfg, family)


def edit_profile(
    attack: MIFGSM, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int
) -> dict[str, float]:
    """CPU milliseconds per attack step spent inside the attack's gradient edits, per
    component: where a hook attack's extra cost over MI goes, without the run-to-run noise of
    whole-step timings. (On a CPU the edits run synchronously, so their wall time is theirs.)"""
    spent: dict[str, float] = {}
    inner = attack.edit

    def timed_edit(bound: Any, g: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = inner(bound, g)
        spent[bound.site.component] = (
            spent.get(bound.site.component, 0.0) + time.perf_counter() - t0
        )
        return out

    attack.edit = timed_edit  # type: ignore[method-assign]
    seeds = list(range(len(x)))
    with attack.source_context(model):
        for _ in range(reps):
            attack.perturb(model, x, y, seeds)
    attack.edit = inner  # type: ignore[method-assign]
    return {c: 1000 * t / (reps * attack.steps) for c, t in spent.items()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", default="vit_base")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2, help="attack steps per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attacks", default="mi,tgr")
    p.add_argument(
        "--profile-edits",
        action="store_true",
        help="CPU: also report ms per step inside TGR's gradient edits, per component",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ATTACK.KEY=VALUE",
        help="a setting of one attack of --attacks (repeatable), e.g. ll2s.num_scale=2",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def _costs(result: dict[str, Any], names: list[str]) -> None:
    sps = result["seconds_per_step"]
    if "mi" in sps:
        result["over_mi"] = {n: sps[n] / sps["mi"] for n in names if n != "mi"}
        for n, ratio in result["over_mi"].items():
            print(f"{n}/mi = {ratio:.3f}")
        if "tgr" in sps:
            result["tgr_over_mi"] = result["over_mi"]["tgr"]


def _settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """`--set ll2s.num_scale=2` as {"ll2s": {"num_scale": 2}} (values read as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        attack, _, name = key.partition(".")
        out.setdefault(attack, {})[name] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    Runtime(device=device).apply()  # exact fp32, as runs default to
    spec, model = random_model(args.source, device)
    family = source_family(spec.arch)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    names = args.attacks.split(",")
    settings = _settings(args.set)
    attacks = {n: attack_of(n, args.steps, family, settings.get(n)) for n in names}
    times = time_interleaved(attacks, model, x, y, args.reps, args.warmup)
    result = {
        "source": args.source,
        "model": spec.model,
        "batch_size": args.batch_size,
        "device": provenance.device_info(device),
        "seconds_per_step": {},
    }
    for name in names:
        s = summary([t / args.steps for t in times[name]])
        result["seconds_per_step"][name] = s["median"]
        print(
            f"{name:>10}: {s['median']:.4f} s/step (median of {s['reps']}; "
            f"min {s['min']:.4f}, max {s['max']:.4f})"
        )
    _costs(result, names)
    if args.profile_edits and device.type == "cpu":
        per = edit_profile(attack_of("tgr", args.steps, family), model, x, y, args.reps)
        sps = result["seconds_per_step"]
        mi_ms = 1000 * sps["mi"] if "mi" in sps else None
        result["tgr_edit_ms_per_step"] = per
        for c, ms in per.items():
            share = f" ({100 * ms / mi_ms:.1f}% of an MI step)" if mi_ms else ""
            print(f"tgr edits, {c}: {ms:.1f} ms per step{share}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
