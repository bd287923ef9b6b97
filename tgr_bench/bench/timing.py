"""Benchmark timing helpers: device-drained wall times, peak memory, random-weight models."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from tgr_bench.attacks import MIFGSM
from tgr_bench.catalogue import model_keys, model_spec
from tgr_bench.models import ModelSpec, PixelModel, WeightFile, build_model
from tgr_bench.pixels import TensorPixels
from tgr_bench.predict import predict


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> list[float]:
    """Seconds of `reps` calls of fn after `warmup` untimed ones, the device drained each time."""
    times = []
    for i in range(warmup + reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "reps": len(times),
    }


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory since the last reset; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _own_pool(attack: MIFGSM, x: torch.Tensor) -> list[int]:
    """Admix mixes in the other images of the timed batch itself."""
    if attack.admix is not None:
        attack.use_pool(TensorPixels((x * 255).round().to(torch.uint8).cpu()))
    return list(range(len(x)))


def time_attack(
    attack: MIFGSM, model: PixelModel, x: torch.Tensor, y: torch.Tensor, reps: int, warmup: int
) -> list[float]:
    """Seconds per full attack (all its steps) on one batch; the TGR probe is not timed."""
    seeds = ids = _own_pool(attack, x)
    with attack.source_context(model):
        return timed(lambda: attack.perturb(model, x, y, seeds, ids), x.device, reps, warmup)


def time_interleaved(
    attacks: dict[str, MIFGSM],
    model: PixelModel,
    x: torch.Tensor,
    y: torch.Tensor,
    reps: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Seconds per full attack for several attacks, their repetitions interleaved (a b a b ...)
    so that drifts of the machine hit all of them alike. Each repetition enters the attack's
    source context afresh (its probe is not timed), so attacks never see each other's hooks."""
    seeds = list(range(len(x)))
    for attack in attacks.values():
        _own_pool(attack, x)
    times: dict[str, list[float]] = {name: [] for name in attacks}
    for i in range(warmup + reps):
        for name, attack in attacks.items():
            with attack.source_context(model):
                (t,) = timed(lambda a=attack: a.perturb(model, x, y, seeds, seeds), x.device, 1, 0)
            if i >= warmup:
                times[name].append(t)
    return times


def time_predict(
    model: PixelModel,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    reps: int,
    warmup: int,
) -> list[float]:
    pixels = TensorPixels(images)
    return timed(lambda: predict(model, pixels, batch_size, device), device, reps, warmup)


def random_model(
    name: str, device: torch.device, precision: str = "fp32"
) -> tuple[ModelSpec, PixelModel]:
    """A catalogue key (its architecture, kwargs and input size) or a timm name, with random
    weights: timing does not depend on them."""
    if name in model_keys():
        spec = replace(model_spec(name), pretrained=False, checkpoint=None)
    else:
        spec = ModelSpec(key=name, model=name, pretrained=False)
    return spec, build_model(spec, WeightFile("random"), device).model.set_speed(precision)
