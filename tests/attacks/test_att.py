"""ATT against the reference port of the release (tests/attacks/official/att.py), on tiny
random-weight sources of each family: the first step's gradient, the importance map, the
PatchOut masks, per-image state, batch invariance, and the settings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tests.attacks.official import att as official
from tests.attacks.support import assert_batch_invariant
from tests.attacks.test_host_sync import forbid_host_sync
from tests.tiny import batch, grad_of, make
from tests.tiny import tiny as build
from tgr_bench.attacks import build_attack
from tgr_bench.attacks.architectures import HEADS_PER_KEY, ROWCOL, SPATIAL, TOKENS
from tgr_bench.attacks.att import (
    OFFICIAL,
    keep_masks,
    keep_values,
    patch_uniforms,
    penalty_factor,
    per_image_var,
    tune,
)
from tgr_bench.errors import UserError
from tgr_bench.images import quantize

FAMILIES = ["vit", "deit", "pit", "cait", "visformer"]
_MODELS: dict = {}


def tiny(family: str):
    """One model per family for the whole file: attacks leave no hook or state on it."""
    if family not in _MODELS:
        _MODELS[family] = build(family)
    return _MODELS[family]


OFF = {"patchout": {"enabled": False}}


def close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-6) -> float:
    """The largest difference relative to the reference's largest entry; asserts <= rtol."""
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    assert rel <= rtol, rel
    return rel


# ---- 1. the edits, per image, against the port's hook functions --------------------------------
def port_state(prev: float) -> official.State:
    state = official.State(0.5, 0.01, [0.45, 0.7, 0.65], torch.ones(4), 3)
    state.var_A = state.var_qkv = state.var_mlp = torch.tensor(prev) if prev else 0
    return state


@pytest.mark.parametrize("prev", [0.0, 1e-3])
@pytest.mark.parametrize(
    "rule,shape,port",
    [
        (ROWCOL, (3, 2, 5, 5), lambda s, g: official.attn_att(s, g, "bchw")),
        (TOKENS, (3, 6, 4), official.v_att),
        (SPATIAL, (3, 4, 3, 3), official.mlp_att),
        (HEADS_PER_KEY, (3, 4, 1, 7), official.attn_cait_att),
    ],
)
def test_each_edit_is_the_release_hook_applied_to_each_image_alone(rule, shape, port, prev):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.03
    g[1] = -g[0]  # image 1's maxima are image 0's minima: shared extremes would be wrong
    weaken = {ROWCOL: 0.45, TOKENS: 0.7, SPATIAL: 0.65, HEADS_PER_KEY: 0.45}[rule]
    out = g * weaken
    previous = torch.full((3,), prev) if prev else None
    gpf = penalty_factor(per_image_var(out), previous, 0.5, 0.01)
    ours = tune(out, rule, gpf)
    for b in range(3):
        state = port_state(prev)
        theirs = port(state, g[b : b + 1].clone())
        assert torch.allclose(ours[b : b + 1], theirs, rtol=1e-6, atol=1e-9)
        kept = {ROWCOL: "var_A", HEADS_PER_KEY: "var_A", TOKENS: "var_qkv", SPATIAL: "var_mlp"}
        assert torch.allclose(per_image_var(ours)[b], getattr(state, kept[rule]))
    assert not torch.equal(ours, out)  # the extremes moved


def test_talking_heads_layout_is_the_same_edit():
    """CaiT: the release edits attn_drop's input (B, N, N, heads); here its output (B, heads, N,
    N), a permutation of the same entries."""
    g = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    for b in range(2):
        theirs = official.attn_att(
            port_state(0.0), g[b : b + 1].permute(0, 2, 3, 1).clone(), "bhwc"
        )
        out = g[b : b + 1] * 0.45
        ours = tune(out, ROWCOL, penalty_factor(per_image_var(out), None, 0.5, 0.01))
        assert torch.allclose(ours, theirs.permute(0, 3, 1, 2), rtol=1e-6, atol=1e-9)


def test_penalty_factor_by_hand():
    now, prev = torch.tensor([4.0, 1.0, 9.0, 5.0]), torch.tensor([1.0, 4.0, 0.0, 1e-9])
    gpf = penalty_factor(now, prev, 0.5, 0.1)
    # 0.5 + 0.1 (1 - 2) = 0.4; 0.5 + 0.1 (1 - 0.5) = 0.55; prev 0: gamma; huge ratio: clamp 0
    assert torch.allclose(gpf, torch.tensor([0.4, 0.55, 0.5, 0.0]))
    assert torch.equal(penalty_factor(now, None, 0.3, 0.1), torch.full((4,), 0.3))


# ---- 2. the first step's input gradient equals the release's ------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_gradient_equals_the_release(family):
    model = tiny(family)
    x, y = batch(1)
    attack = make("att", family, **OFF)
    with attack.source_context(model):
        ours = grad_of(attack, model, x, y)
        fired = dict(attack.fired)
    port_fired: Counter = Counter()
    theirs = official.official_gradient(model, x, y, family, fired=port_fired)
    close(ours, theirs)
    plain = grad_of(make("mi"), model, x, y)
    assert (plain - theirs).abs().max() > 1e-2 * theirs.abs().max()  # the edits matter
    kinds = {"attn_drop": "attn", "q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "mlp": "mlp"}
    want: Counter = Counter()
    for path, n in port_fired.items():
        want[kinds[path.rsplit(".", 1)[-1]]] += n
    assert fired == dict(want)  # every hooked module of the release, once


@pytest.mark.parametrize(
    "family,keys,port",
    [
        ("vit", {"lam": 0.5, "gamma": 0.7, "truncated": 0}, {"lam": 0.5, "gamma": 0.7,
                                                              "truncated": 0}),
        ("cait", {"lam": 0.3, "weaken": {"attn": 0.9, "qkv": 0.5, "mlp": 0.2}, "truncated": 1},
         {"lam": 0.3, "weaken_factor": (0.9, 0.5, 0.2), "truncated": 1}),
    ],
)  # fmt: skip
def test_first_step_gradient_with_other_constants(family, keys, port):
    model = tiny(family)
    x, y = batch(1, seed=5)
    attack = make("att", family, **OFF, **keys)
    with attack.source_context(model):
        ours = grad_of(attack, model, x, y)
    close(ours, official.official_gradient(model, x, y, family, **port))


# ---- 3. the self-paced PatchOut -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_importance_keep_values_and_masks_equal_the_release(family):
    model = tiny(family)
    x, _ = batch(1, seed=4)
    attack = make("att", family)
    with attack.source_context(model):
        ours = attack.importance(model, x)
    theirs = official.official_importance(model, x, family)
    close(ours, theirs)
    o = OFFICIAL["vit" if family == "deit" else family]
    t = keep_values(theirs, 16, o.scale, o.offset)  # from the same map: the same values
    keep_map = official.official_keep_map(theirs, 16, o.scale, o.offset)
    assert torch.equal(t, keep_map[:, ::16, ::16])
    assert float(t.min()) == pytest.approx(o.offset) and float(t.max()) == pytest.approx(
        o.offset + o.scale
    )
    for step in range(10):  # the same uniforms: the same mask, bit for bit
        u = official.official_uniforms(step, (4, 4))
        mine = keep_masks(t, u[None], step, 10, 0.99)
        mine = mine.repeat_interleave(16, 1).repeat_interleave(16, 2)
        assert torch.equal(mine, official.official_patchout_mask(keep_map, step, u))


def test_keep_frequency_follows_the_self_paced_rule():
    t = torch.tensor([[[0.4, 0.5], [0.6, 0.8]]])  # (1, 2, 2) patch values
    seeds = range(3000)
    for step in (0, 4, 9):
        u = patch_uniforms(seeds, step, (2, 2), torch.device("cpu"))
        kept = keep_masks(t.expand(len(u), -1, -1), u, step, 10, 0.99).mean(0)
        p = 0.99 - (0.99 - t[0]) * (step + 1) / 10
        sigma = (p * (1 - p) / len(u)).sqrt()
        assert ((kept - p).abs() <= 4.5 * sigma + 1e-9).all(), (step, kept, p)
    u = patch_uniforms([5, 6], 3, (2, 2), torch.device("cpu"))
    assert torch.equal(u[1], patch_uniforms([6], 3, (2, 2), torch.device("cpu"))[0])
    assert not torch.equal(u[0], u[1])  # each image its own draw
    flat = keep_values(torch.ones(1, 32, 32), 16, 0.4, 0.4)  # no contrast: 0/0 keeps all
    assert keep_masks(flat, torch.rand(1, 2, 2), 9, 10, 0.99).eq(1).all()


@pytest.mark.parametrize("family", ["vit"])
def test_whole_attack_equals_the_release_with_the_same_draws(family):
    model = tiny(family)
    x, y = batch(1, seed=6)
    seed = 11
    attack = make("att", family, steps=2)
    with attack.source_context(model):
        ours = attack.perturb(model, x, y, [seed])

    def same(step, grid):
        return patch_uniforms([seed], step, grid, torch.device("cpu"))[0]

    theirs = official.official_attack(model, x, y, family, steps=2, uniforms=same)
    clean = (x * 255).round().to(torch.uint8)
    assert torch.equal(quantize(ours, clean, 16), quantize(theirs, clean, 16))


def test_patchout_off_leaves_the_perturbation_whole():
    model = tiny("vit")
    x, y = batch(1)
    on, off = make("att", "vit"), make("att", "vit", **OFF)
    with on.source_context(model):  # binds the source
        on._keep = torch.full((1, 4, 4), 0.5)  # the last step keeps about half the patches
        masked = on.model_input(x, torch.ones_like(x), 9, [0])
        on._keep = None
    assert 0 < float((masked - x).mean()) < 1
    assert torch.equal(off.model_input(x, torch.ones_like(x), 9, [0]), x + 1)
    assert on.label == off.label == "att"
    assert "patchout" not in on.params() and off.params()["patchout"] is False


# ---- 4. per-image state, batch invariance, sites, host syncs -----------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_three_equals_each_image_alone(family):
    assert_batch_invariant(make("att", family, steps=2), tiny(family), 3)


def test_state_starts_fresh_for_every_pass_image_and_batch():
    model = tiny("vit")
    x, y = batch(3)
    attack = make("att", "vit", steps=2)
    fresh_at_forward: list[bool] = []

    def watch(module, args):  # registered after the attack's reset
        fresh_at_forward.append(all(v is None for v in attack._var.values()))

    with attack.source_context(model):
        handle = model.net.register_forward_pre_hook(watch)
        attack.perturb(model, x[:2], y[:2], [0, 1])  # an earlier batch of two
        assert attack._var["attn"].shape == (2,)  # one variance per image
        handle.remove()
        attack.perturb(model, x[1:2], y[1:2], [1])  # an earlier batch of one
        later = attack.perturb(model, x[2:], y[2:], [2])
        keep_later = keep_values(attack.importance(model, x[2:]), 16, 0.4, 0.4)
    assert fresh_at_forward == [True] * 3  # the importance pass and both steps
    other = make("att", "vit", steps=2)
    with other.source_context(model):
        alone = other.perturb(model, x[2:], y[2:], [2])
        keep_alone = keep_values(other.importance(model, x[2:]), 16, 0.4, 0.4)
    # Nothing carries over from the images or batches attacked before (the release carries the
    # last step's variances into the next image's importance pass).
    assert torch.equal(later, alone)
    assert torch.equal(keep_later, keep_alone)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_of_the_release_fires_in_the_probe(family):
    model = tiny(family)
    attack = make("att", family)
    with attack.source_context(model):
        assert attack._sites and all(attack._site_fired[b.name] for b in attack._sites)
    names = [b.name for b in attack._sites]
    port = [p for p, _ in official.hook_sites(model.net, family)]
    if family == "visformer":  # the release's mlp hook edits conv3's input: the same gradient
        port = [p + ".conv3" if p.endswith(".mlp") else p for p in port]
    assert sorted(names) == sorted(port)


@pytest.mark.parametrize("family", ["cait", "visformer"])
def test_no_host_sync_in_the_hooks_the_importance_pass_or_the_loop(family):
    model = tiny(family)
    attack = make("att", family, steps=2, patchout={"importance": "gradient"})
    x, y = batch(2)
    with attack.source_context(model), forbid_host_sync() as calls:
        attack.perturb(model, x, y, [1, 2])
    assert calls == []


# ---- 5. settings -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "deit", "pit", "cait", "visformer"])
def test_auto_resolves_to_the_family_release_values(family):
    params = make("att", family).params()
    o = OFFICIAL["vit" if family == "deit" else family]
    assert (params["weaken_attn"], params["weaken_qkv"], params["weaken_mlp"]) == o.weaken
    assert params["truncated"] == o.truncated
    assert (params["patchout_scale"], params["patchout_offset"]) == (o.scale, o.offset)
    assert (params["patchout_block"], params["patchout_importance"]) == (o.block, o.importance)
    assert (params["gamma"], params["lam"], params["patchout_keep_start"]) == (0.5, 0.01, 0.99)
    custom = make("att", family, weaken={"mlp": 0.2}, truncated=1, patchout={"scale": 0.1})
    p = custom.params()
    assert (p["weaken_mlp"], p["weaken_attn"], p["truncated"], p["patchout_scale"]) == (
        0.2, o.weaken[0], 1, 0.1,
    )  # fmt: skip


@pytest.mark.parametrize(
    "params,match",
    [
        ({"weaken": {"attn": 1.5}}, r"attack.weaken.attn=1.5 is outside the allowed range"),
        ({"weaken": {"mlp": -0.1}}, r"attack.weaken.mlp=-0.1 is outside"),
        ({"weaken": {"qkv": "x"}}, "not a number"),
        ({"gamma": 2}, "attack.gamma=2"),
        ({"lam": -1}, "attack.lam=-1"),
        ({"truncated": -1}, "attack.truncated=-1"),
        ({"patchout": {"scale": 2}}, "attack.patchout.scale=2"),
        ({"patchout": {"block": 0}}, "attack.patchout.block=0"),
        ({"patchout": {"importance": "saliency"}}, "attack.patchout.importance"),
        ({"patchout": {"n_patches": 10}}, "there is no key attack.patchout.n_patches"),
    ],
)
def test_bad_settings_are_refused(params, match):
    with pytest.raises(UserError, match=match):
        build_attack({"name": "att", **params}, "vit")


def test_unsupported_sources_are_refused():
    with pytest.raises(
        UserError, match=r"ATT does not support .*resnet.*vit.*pit.*cait.*visformer"
    ):
        make("att", "resnet")
    attack = make("att", "vit", patchout={"block": 3})
    with (
        pytest.raises(UserError, match="attack.patchout.block=3: the vit source has 2 blocks"),
        attack.source_context(tiny("vit")),
    ):
        pass
    attack = make("att", "vit", patchout={"patch_size": 24})
    model = tiny("vit")
    x, y = batch(1)
    with (
        pytest.raises(UserError, match="patch_size=24 does not tile 64x64"),
        attack.source_context(model),
    ):
        attack.perturb(model, x, y, [0])


def test_cli_run_records_the_resolved_constants(tgr, tmp_path: Path):
    out = tmp_path / "run"
    r = tgr(
        "experiment=smoke",
        "attack=att",
        "source=test_cait",
        "data.n=2",
        "attack.steps=2",
        "targets=smoke",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr
    params = pd.read_csv(out / "results.csv").params.iloc[0]
    assert "weaken_attn=0.3" in params and "truncated=21" in params, params
    assert len(list((out / "images").glob("*.png"))) == 2


def test_importance_map_is_per_image():
    model = tiny("pit")
    x, _ = batch(3, seed=8)
    attack = make("att", "pit")
    with attack.source_context(model):
        together = attack.importance(model, x)
        alone = torch.cat([attack.importance(model, x[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-6 * together.abs().max())
    assert F.mse_loss(together[0], together[1]) > 0
