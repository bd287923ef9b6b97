"""TGR against docs/tgr.md, on tiny random-weight variants of each source family."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.attacks.support import capture
from tests.tiny import batch, grad_of, make, tiny
from tgr_bench.attacks import build_attack
from tgr_bench.attacks.architectures import (
    HEADS_PER_KEY,
    KEYS,
    OUTPUT,
    ROWCOL,
    SCALE,
    SPATIAL,
    TOKENS,
    bind_sites,
    family_of,
)
from tgr_bench.attacks.tgr import regularize
from tgr_bench.errors import UserError
from tgr_bench.images import quantize
from tgr_bench.pipeline import run


# ---- an independent, loop-by-loop reading of docs/tgr.md section 2 ---------------------------
def extremes(values: torch.Tensor, k: int) -> set[int]:
    """k largest and k smallest; among equal values the first position, as numpy's argmax."""
    top = torch.sort(values, descending=True, stable=True).indices[:k]
    bottom = torch.sort(values, stable=True).indices[:k]
    return set(top.tolist()) | set(bottom.tolist())


def naive(g: torch.Tensor, rule: str, gamma: float, k: int) -> torch.Tensor:
    out = g.clone() * gamma
    for b in range(g.shape[0]):
        if rule == TOKENS:  # (B,N,C): per channel over tokens
            for c in range(g.shape[2]):
                for t in extremes(g[b, :, c], k):
                    out[b, t, c] = 0
        elif rule == SPATIAL:  # (B,C,H,W): per channel over (h, w)
            w = g.shape[3]
            for c in range(g.shape[1]):
                for p in extremes(g[b, c].flatten(), k):
                    out[b, c, p // w, p % w] = 0
        elif rule == ROWCOL:  # (B,heads,N,M): rows and columns through the extremes
            m = g.shape[3]
            for h in range(g.shape[1]):
                for p in extremes(g[b, h].flatten(), k):
                    out[b, h, p // m, :] = 0
                    out[b, h, :, p % m] = 0
        elif rule == HEADS_PER_KEY:  # (B,heads,1,N): per key over heads
            for n in range(g.shape[3]):
                for h in extremes(g[b, :, 0, n], k):
                    out[b, h, 0, n] = 0
        elif rule == KEYS:  # (B,heads,1,N): per head over keys
            for h in range(g.shape[1]):
                for n in extremes(g[b, h, 0], k):
                    out[b, h, 0, n] = 0
    return out


# ---- 1. the regularizer on hand-made tensors ----------------------------------------------------
def test_token_rule_k1_by_hand():
    g = torch.tensor([[[3.0, 1.0], [-1.0, 2.0], [0.0, -3.0], [5.0, 0.5]]])  # (1, N=4, C=2)
    out = regularize(g, TOKENS, 0.5, 1)
    # channel 0: max 5 (token 3), min -1 (token 1); channel 1: max 2 (token 1), min -3 (token 2)
    assert out.tolist() == [[[1.5, 0.5], [0.0, 0.0], [0.0, 0.0], [0.0, 0.25]]]


def test_token_rule_k2_by_hand():
    g = torch.tensor([[[3.0], [-1.0], [0.0], [5.0], [1.0]]])  # (1, N=5, C=1)
    out = regularize(g, TOKENS, 1.0, 2)
    assert out.flatten().tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]  # only the median survives


def test_row_column_rule_k1_by_hand():
    g = torch.tensor(
        [[[[1.0, 2.0, 9.0], [4.0, 5.0, 6.0], [7.0, -8.0, 3.0]]]]
    )  # max (0,2), min (2,1)
    out = regularize(g, ROWCOL, 0.25, 1)
    expected = torch.zeros(1, 1, 3, 3)
    expected[0, 0, 1, 0] = 1.0  # row 0, row 2, column 2 and column 1 are zeroed
    assert torch.equal(out, expected)


def test_row_column_rule_k2_by_hand():
    g = torch.arange(16.0).view(1, 1, 4, 4)  # max 15 (3,3), 14 (3,2); min 0 (0,0), 1 (0,1)
    out = regularize(g, ROWCOL, 1.0, 2)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1:3, :] = g[0, 0, 1:3, :]
    expected[..., [0, 1, 2, 3]] *= torch.tensor([0.0, 0.0, 0.0, 0.0])  # every column is hit
    assert torch.equal(out, expected)
    g5 = torch.arange(25.0).view(1, 1, 5, 5)  # rows 0, 4 and columns 0, 1, 3, 4 go
    out5 = regularize(g5, ROWCOL, 1.0, 2)
    assert out5.nonzero().tolist() == [[0, 0, r, 2] for r in (1, 2, 3)]


def test_channel_rule_is_per_sample_and_per_channel():
    g = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    g[1] = -g[0]  # sample 1's maxima are sample 0's minima: shared extremes would be wrong
    for k in (1, 2):
        out = regularize(g, TOKENS, 0.75, k)
        assert torch.equal(out, naive(g, TOKENS, 0.75, k))
        assert int((out == 0).sum()) == 3 * 5 * 2 * k
        for b in range(3):
            assert torch.equal(out[b : b + 1], regularize(g[b : b + 1], TOKENS, 0.75, k))


@pytest.mark.parametrize(
    "rule,shape",
    [
        (ROWCOL, (2, 3, 6, 6)),
        (SPATIAL, (2, 4, 3, 5)),
        (HEADS_PER_KEY, (2, 5, 1, 9)),
        (KEYS, (2, 5, 1, 9)),
    ],
)
@pytest.mark.parametrize("k", [1, 2])
def test_every_rule_matches_the_loop_reading(rule, shape, k):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
    assert torch.equal(regularize(g, rule, 0.5, k), naive(g, rule, 0.5, k))


# ---- 2. each component alone changes the gradient; off restores it -----------------------------
@pytest.mark.parametrize("family", ["vit", "pit", "cait", "visformer"])
def test_each_component_changes_the_gradient_and_removal_restores_it(family):
    model = tiny(family)
    x, y = batch(2)
    mi = grad_of(make("mi"), model, x, y)
    fused_before = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    for component in ("attn", "qkv", "mlp"):
        attack = make("tgr", family, components=[component])
        with attack.source_context(model):
            g = grad_of(attack, model, x, y)
        assert attack.fired[component] > 0 and set(attack.fired) == {component}
        assert (g - mi).abs().max() > 1e-3 * mi.abs().max(), component
        assert torch.equal(grad_of(make("mi"), model, x, y), mi)  # hooks gone
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused_before


def test_gamma_scales_the_branch_and_k_must_be_positive():
    model = tiny("vit")
    x, y = batch(1)
    a = make("tgr", "vit", components=["mlp"], gamma={"mlp": 0.0})
    with a.source_context(model):
        g0 = grad_of(a, model, x, y)
    b = make("tgr", "vit", components=["mlp"], gamma={"mlp": 1.0})
    with b.source_context(model):
        g1 = grad_of(b, model, x, y)
    assert not torch.equal(g0, g1)
    with pytest.raises(UserError, match="k=0"):
        make("tgr", "vit", k=0)


# ---- 3. batch invariance ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "deit", "pit", "cait", "visformer"])
def test_batch_equals_alone(family):
    model = tiny(family)
    x, y = batch(3)
    attack = make("tgr", family)
    with attack.source_context(model):
        together = grad_of(attack, model, x, y)
        alone = torch.cat([grad_of(attack, model, x[i : i + 1], y[i : i + 1]) for i in range(3)])
        # Equal up to float summation order of batched kernels; the PNGs below are identical.
        assert torch.allclose(together, alone, rtol=1e-3, atol=1e-4 * together.abs().max())
        seeds = [0, 0, 0]
        clean = (x * 255).round().to(torch.uint8)
        png_together = quantize(attack.perturb(model, x, y, seeds), clean, 16)
        png_alone = torch.cat(
            [
                quantize(
                    attack.perturb(model, x[i : i + 1], y[i : i + 1], seeds[i : i + 1]),
                    clean[i : i + 1],
                    16,
                )
                for i in range(3)
            ]
        )
    assert torch.equal(png_together, png_alone)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"gamma": {"attn": 1.5}}, "outside"),
        ({"gamma": {"mlp": -0.1}}, "outside"),
        ({"gamma": {"mlp": "half"}}, "attack.gamma.mlp='half' is not a number"),
        ({"gamma": {"ffn": 0.5}}, "there is no key attack.gamma.ffn"),
        ({"components": ["attn", "proj"]}, "components"),
        ({"components": []}, "components"),
        ({"variant": "paper"}, "variant"),
        ({"k": 1.5}, "k="),
    ],
)
def test_bad_tgr_parameters(params, match):
    with pytest.raises(UserError, match=match):
        build_attack({"name": "tgr", **params}, "vit")


def test_k_larger_than_tokens_fails_before_any_work(make_cfg, tmp_path: Path):
    cfg = make_cfg(
        "experiment=smoke",
        "attack=tgr",
        "source=test_deit",
        "attack.variant=clean",  # `official` only scales on DeiT: any k fits there
        "attack.k=40",
        "targets=none",
    )
    out = tmp_path / "out"
    with pytest.raises(UserError, match="attack.k=40 is larger than the 18 positions"):
        run(cfg, output_dir=out)
    assert not out.exists()


# ---- 5. the gradient reaching each regularized tensor's producer -------------------------------
@pytest.mark.parametrize("family", ["vit", "deit", "pit", "cait", "visformer"])
@pytest.mark.parametrize("k", [1, 2])
def test_gradient_at_every_site_is_the_spec_transform(family, k):
    model = tiny(family)
    x, y = batch(2)
    attack = make("tgr", family, k=k, variant="official")
    log: dict = {}
    handles = []
    with attack.source_context(model):
        sites = attack._sites  # the rules as bound: on DeiT, `official` only scales
        for b in sites:
            h = capture(b, log)
            handles += h if isinstance(h, list) else [h]
        grad_of(attack, model, x, y)
    for h in handles:
        h.remove()
    assert set(log) == {b.name for b in sites}
    for b in sites:
        got, arrive = log[b.name]["reach"], log[b.name]["arrive"]
        kk = 1 if b.site.clamp_k else k
        want = naive(arrive, b.site.rule, attack.gamma[b.site.component], kk)
        scale = arrive.abs().max()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale), (
            b.name,
            (got - want).abs().max(),
        )
        assert (got[want == 0] == 0).all(), b.name  # the zeroed entries are exactly zero


# ---- 5b. DeiT: the released code hooks it, but zeroes nothing there ---------------------------
def site_gradients(variant: str) -> tuple:
    """The bound sites of TGR on the tiny DeiT, and the gradients arriving at and leaving each."""
    model = tiny("deit")
    x, y = batch(2)
    attack = make("tgr", "deit", variant=variant)
    log: dict = {}
    handles = []
    with attack.source_context(model):
        for b in attack._sites:
            h = capture(b, log)
            handles += h if isinstance(h, list) else [h]
        grad_of(attack, model, x, y)
        stats = attack.stats()
    for h in handles:
        h.remove()
    return attack._sites, log, attack, stats


def test_deit_official_only_scales_and_clean_zeroes():
    """methods.py hooks DeiT (line 224) but its zeroing branches name only ViT, PiT, CaiT and
    Visformer (lines 110, 177, 201): on DeiT, `official` is gamma * G exactly, no zeros."""
    sites, log, attack, stats = site_gradients("official")
    assert {b.site.rule for b in sites} == {SCALE} and len(sites) == 6  # 2 blocks x 3
    assert stats["tgr_scale_only"] is True
    for b in sites:
        got, arrive = log[b.name]["reach"], log[b.name]["arrive"]
        want = arrive * attack.gamma[b.site.component]
        assert torch.equal(got != 0, arrive != 0), b.name  # nothing zeroed
        if b.site.where == OUTPUT:  # qkv, mlp: the very gradient that arrived, times gamma
            assert torch.equal(got, want), b.name
        else:  # attn: the arriving gradient at the scores is recomputed by `capture`
            scale = arrive.abs().max()
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * scale), b.name
    sites, log, attack, stats = site_gradients("clean")
    assert [b.site.rule for b in sites] == [ROWCOL, TOKENS, TOKENS] * 2
    assert "tgr_scale_only" not in stats
    for b in sites:
        got, arrive = log[b.name]["reach"], log[b.name]["arrive"]
        want = naive(arrive, b.site.rule, attack.gamma[b.site.component], 1)
        scale = arrive.abs().max()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale), b.name
        assert (got[want == 0] == 0).all() and (want == 0).any(), b.name


def test_official_zeroes_on_vit_as_before():
    """A plain ViT (and PiT, CaiT, Visformer) keeps the zeroing rules under `official`."""
    model = tiny("vit")
    attack = make("tgr", "vit", variant="official")
    with attack.source_context(model):
        rules = [b.site.rule for b in attack._sites]
    assert rules == [ROWCOL, TOKENS, TOKENS] * 2 and "tgr_scale_only" not in attack.stats()


# ---- 6. CaiT's class-attention blocks, both variants -------------------------------------------
def cait_log(variant: str) -> tuple[dict, dict]:
    """Gradients arriving at, and leaving, q and the MLP of both class-attention blocks."""
    model = tiny("cait")
    x, y = batch(2)
    net = model.net
    arrive: dict = {}
    reach: dict = {}

    def watch(key):
        def save_arrive(g):
            arrive.setdefault(key, g.detach().clone())

        def save_reach(grad_outputs):
            reach.setdefault(key, grad_outputs[0].detach().clone())

        def hook(module, args, out):
            out.register_hook(save_arrive)
            out.grad_fn.register_prehook(save_reach)  # after the attack's pre-hook

        return hook

    attack = make("tgr", "cait", variant=variant)
    with attack.source_context(model):
        handles = []
        for i in (0, 1):
            block = net.blocks_token_only[i]
            handles.append(block.attn.q.register_forward_hook(watch(f"q{i}")))
            handles.append(block.mlp.register_forward_hook(watch(f"mlp{i}")))
        grad_of(attack, model, x, y)
    for h in handles:
        h.remove()
    return arrive, reach


def test_cait_official_quirks():
    model = tiny("cait")
    names = [b.name for b in bind_sites(model.net, family_of(model.net), "official")]
    assert any(n.startswith("blocks_token_only.1.") for n in names)
    assert not any(n.startswith("blocks_token_only.0.") for n in names)  # the loop skipped 0
    assert "blocks_token_only.1.attn.q" not in names  # q: no effect
    assert {"blocks_token_only.1.attn.k", "blocks_token_only.1.attn.v"} <= set(names)
    arrive, reach = cait_log("official")
    assert torch.equal(reach["q1"], arrive["q1"])  # q untouched
    assert torch.equal(reach["mlp0"], arrive["mlp0"])  # block 0 untouched
    assert arrive["mlp1"].abs().max() > 0 and (reach["mlp1"] == 0).all()  # one token: zeroed


def test_cait_clean_variant():
    model = tiny("cait")
    bound = bind_sites(model.net, family_of(model.net), "clean")
    names = [b.name for b in bound]
    for i in (0, 1):
        assert f"blocks_token_only.{i}.attn.attn_drop" in names
        assert (
            f"blocks_token_only.{i}.mlp" not in names
            and f"blocks_token_only.{i}.attn.q" not in names
        )
    assert {b.site.rule for b in bound if b.name.startswith("blocks_token_only")} == {KEYS, TOKENS}
    arrive, reach = cait_log("clean")
    for i in (0, 1):
        assert torch.equal(reach[f"q{i}"], arrive[f"q{i}"])
        assert torch.equal(reach[f"mlp{i}"], arrive[f"mlp{i}"])


# ---- the CLI: hyper-parameters recorded, and a k sweep ------------------------------------------
@pytest.mark.slow
def test_cli_overrides_and_k_sweep(tgr, tmp_path: Path):
    sweep = tmp_path / "sweep"
    r = tgr(
        "-m",
        "experiment=smoke",
        "attack=tgr",
        "source=test_pit",
        "data.n=2",
        "attack.steps=2",
        "attack.k=1,2",
        "attack.components=[attn,qkv]",
        "attack.gamma.qkv=0.5",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr
    runs = sorted(p for p in sweep.iterdir() if (p / "results.csv").exists())
    assert len(runs) == 2
    params = [pd.read_csv(p / "results.csv").params.iloc[0] for p in runs]
    assert [("k=1" in p, "k=2" in p) for p in params] == [(True, False), (False, True)]
    assert all("components=attn+qkv" in p and "gamma_qkv=0.5" in p for p in params)
    fired = json.loads((runs[0] / "run.json").read_text())["crafting"]["hooks"]["tgr_fired"]
    assert set(fired) == {"attn", "qkv"} and min(fired.values()) > 0


def test_ties_go_to_the_first_position_like_the_released_code():
    g = torch.full((1, 4, 1), 0.5)  # a gradient constant over tokens
    out = regularize(g, TOKENS, 1.0, 1)
    assert out.flatten().tolist() == [0.0, 0.5, 0.5, 0.5]  # argmax = argmin = token 0
    g2 = torch.tensor([[[1.0], [3.0], [3.0], [-2.0], [-2.0]]])
    assert regularize(g2, TOKENS, 1.0, 1).flatten().tolist() == [1.0, 0.0, 3.0, 0.0, -2.0]
    assert regularize(g2, TOKENS, 1.0, 2).flatten().tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


# ---- the fast regularizer equals the one it replaced, bit for bit ------------------------------
def argmax_extremes(g: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """The previous implementation (argmax/argmin, stable sorts): the reference for speed-ups."""
    if k == 1:
        return torch.stack([g.argmax(dim), g.argmin(dim)], dim)
    top = g.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    bottom = g.sort(dim=dim, stable=True).indices.narrow(dim, 0, k)
    return torch.cat([top, bottom], dim)


def mask_rows_cols(g: torch.Tensor, k: int) -> torch.Tensor:
    """The previous row/column zeroing: two multiplications by keep-masks."""
    b, h, n, m = g.shape
    idx = argmax_extremes(g.reshape(b, h, n * m), -1, k)
    rows = torch.ones(b, h, n).scatter_(-1, idx // m, 0.0)
    cols = torch.ones(b, h, m).scatter_(-1, idx % m, 0.0)
    return g * rows.unsqueeze(-1) * cols.unsqueeze(-2)


def tied(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Few distinct values: many ties for the maximum and the minimum."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).float() * 0.25


@pytest.mark.parametrize("kind", ["random", "tied"])
@pytest.mark.parametrize("k", [1, 2])
def test_extreme_indices_equal_the_previous_implementation(kind: str, k: int):
    from tgr_bench.attacks.tgr import extreme_indices

    for seed in range(5):
        for shape, dim in (((4, 197, 96), 1), ((4, 3, 50), -1), ((2, 6, 1, 17), 1)):
            g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            g = g if kind == "random" else tied(shape, seed)
            assert torch.equal(extreme_indices(g, dim, k), argmax_extremes(g, dim, k))


@pytest.mark.parametrize("kind", ["random", "tied"])
@pytest.mark.parametrize("k", [1, 2])
def test_row_column_zeroing_equals_the_previous_implementation(kind: str, k: int):
    for seed in range(5):
        shape = (3, 4, 9, 9)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        g = g if kind == "random" else tied(shape, seed)
        new = regularize(g, ROWCOL, 0.25, k)
        assert torch.equal(new, mask_rows_cols(g * 0.25, k))


def test_deits_scale_only_rule_is_in_the_run_identity():
    """The DeiT rule is known from the model name before any network exists, so DeiT runs under
    `official` have an identity of their own (and runs made under another rule never resume
    into them); ViT's identity is unchanged, and a network that contradicts its name stops."""
    from tgr_bench.attacks import create

    deit, vit = (
        "deit_base_distilled_patch16_224.fb_in1k",
        "vit_base_patch16_224.augreg_in21k_ft_in1k",
    )
    assert create("tgr", "vit", arch=deit).params()["scale_only"] is True
    assert "scale_only" not in create("tgr", "vit", arch=deit, variant="clean").params()
    assert "scale_only" not in create("tgr", "vit", arch=vit).params()
    assert "scale_only" not in create("tgr", "vit").params()  # no name: decided on the network
    named_vit = create("tgr", "vit", arch=vit)
    model = tiny("deit")
    with (
        pytest.raises(UserError, match="is a DeiT, but its model name"),
        named_vit.source_context(model),
    ):
        pass
