"""No host synchronization inside the attack loop or the hooks (a CPU-side guard)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from tests.attacks.support import pool_of
from tests.tiny import FAMILY, batch, tiny
from tgr_bench.attacks import build_attack

# Every Tensor method that copies a value to the host (on a GPU: waits for the device).
SYNCING = ("item", "cpu", "numpy", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[list[str]]:
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def guard(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return method

    # Host data copied to a device without non_blocking: CUDA waits for the queued work first.
    to, factories = torch.Tensor.to, {f: getattr(torch, f) for f in ("tensor", "as_tensor")}

    def blocking_to(self, *args, **kwargs):
        moves = "device" in kwargs or any(
            isinstance(a, str | torch.device | torch.Tensor) for a in args
        )
        if moves and not kwargs.get("non_blocking", False) and True not in args[1:]:
            calls.append("to(device)")
        return to(self, *args, **kwargs)

    new_tensor = torch.Tensor.new_tensor

    def blocking_new_tensor(self, data, *args, **kwargs):
        calls.append("new_tensor")  # host data copied to self's device
        return new_tensor(self, data, *args, **kwargs)

    def factory(name):
        def make(data, *args, **kwargs):
            if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
                calls.append(f"{name}(device=)")
            return factories[name](data, *args, **kwargs)

        return make

    for name in SYNCING:
        setattr(torch.Tensor, name, guard(name))
    torch.Tensor.to = blocking_to
    torch.Tensor.new_tensor = blocking_new_tensor
    for name in factories:
        setattr(torch, name, factory(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.Tensor.to = to
        torch.Tensor.new_tensor = new_tensor
        for name, original in factories.items():
            setattr(torch, name, original)


def test_the_guard_sees_syncs():
    with forbid_host_sync() as calls:
        torch.ones(2).sum().item()
        bool(torch.ones(1) > 0)
        torch.tensor([1, 2], device="cpu")
        torch.ones(2).to("cpu")
        torch.ones(2).to(torch.zeros(1, dtype=torch.float64))
        torch.ones(2).to("cpu", non_blocking=True)  # allowed: no wait for the device
        torch.ones(2).to(torch.float64)  # allowed: no copy between devices
        torch.ones(2).new_tensor([3.0])
    assert calls == [
        *("item", "__bool__", "tensor(device=)", "to(device)", "to(device)", "new_tensor")
    ]


@pytest.mark.parametrize(
    "name,family",
    [
        ("mi", "vit"),
        ("vmi", "vit"),
        ("sgm", "pit"),
        ("pna", "cait"),
        ("tgr", "vit"),
        ("tgr", "cait"),
        ("tgr", "visformer"),
        ("pna_patchout", "vit"),
        ("tgr_patchout", "pit"),
        ("mi_di_ti", "vit"),
        ("tgr_di_ti", "deit"),
        ("tgr attack.si.enabled=true", "vit"),
        ("mi attack.admix.enabled=true attack.di.enabled=true", "pit"),
        ("vmi attack.di.enabled=true", "vit"),
    ],
)
def test_attack_loop_and_hooks_never_sync(make_cfg, name, family):
    name, *modifiers = name.split()
    extra = ["attack.n_samples=2"] if name == "vmi" else []
    cfg = make_cfg(f"attack={name}", "attack.steps=2", *extra, *modifiers)
    attack = build_attack(cfg.attack, FAMILY[family])
    if attack.admix is not None:
        attack.use_pool(pool_of(4))
    if attack.patchout is not None:
        attack.patchout = type(attack.patchout)(
            n_patches=10, patch_size=16, l2=attack.patchout.l2, mask=attack.patchout.mask
        )
    model = tiny(family)
    x, y = batch(2)
    # The one-off probe (entering the context) may read counts; the loop may not.
    with attack.source_context(model), forbid_host_sync() as calls:
        attack.perturb(model, x, y, [1, 2], [0, 1])
    assert calls == [], f"{name} on {family} synced the host: {calls}"
