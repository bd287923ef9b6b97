"""FPR against the released code (tests/attacks/official/fpr.py, a line-by-line port of
RYC-98/FPR vitb.py, deitb.py, pitt.py, caits.py) and docs/fpr.md: the diversified attention
map, the embedding momentum, whole attacks at batch 1, batch invariance, fresh state per batch,
refusals."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.attacks.official import fpr as official
from tests.attacks.support import assert_batch_invariant
from tests.attacks.test_host_sync import forbid_host_sync
from tests.tiny import batch, make, tiny
from tgr_bench.attacks.fpr import PRESETS, multipliers
from tgr_bench.attacks.hooks import set_fused_attn
from tgr_bench.errors import UserError
from tgr_bench.images import quantize

# Blocks of the tiny sources in place of the released lists (tests/tiny.py has 1-2 per stage).
TINY_ATTN = {
    "vit": ["blocks.0", "blocks.1"],
    "deit": ["blocks.1"],
    "pit": ["transformers.0.blocks.1", "transformers.2.blocks.0"],
    "cait": ["blocks.1", "blocks_token_only.1"],
}
PRESET = {"deit": "deit"}  # the tiny DeiT is distilled: auto would be refused


def fpr(family: str, **keys):
    keys = {"attn_blocks": TINY_ATTN[family], "steps": 3, **keys}
    if family in PRESET:
        keys.setdefault("preset", PRESET[family])
    return make("fpr", family, **keys)


def recorder(module, log: list, prepend: bool):
    """A forward hook that records the module's output: before FPR's edit (prepend) or after."""
    return module.register_forward_hook(
        lambda m, a, out: log.append(out.detach().clone()), prepend=prepend
    )


def test_the_presets_are_the_released_settings():
    for name, preset in PRESETS.items():
        released = official.OFFICIAL[name]
        assert preset.attn_blocks == released["attn_blocks"]
        assert preset.attn_map_change_range == released["attn_map_change_range"]
        assert preset.scale == released["scale"]
        assert preset.mom_emb_decay == released["mom_emb_decay"]
    assert make("fpr", "vit").params()["preset"] == "vit"
    assert make("fpr", "cait").params()["attn_map_change_range"] == 30.0
    assert make("fpr", "pit").params()["scale"] == 0.7


@pytest.mark.parametrize("family", ["vit", "pit", "cait"])
def test_every_hooked_site_is_the_released_one(family):
    model = tiny(family)
    attack = fpr(family)
    with attack.source_context(model):
        sites = list(attack._sites)
    want = official.hook_sites(family, model.net, attn_blocks=tuple(TINY_ATTN[family]))
    assert sorted(sites) == sorted(want["attn_map"] + want["attn"] + want["mlp"])


@pytest.mark.parametrize("family", ["vit", "cait"])
def test_the_attention_map_is_softmax_of_p_times_m_per_image(family):
    """CaiT: the talking-heads map (after proj_w) and the class-attention map (N_q = 1)."""
    model = tiny(family)
    attack = fpr(family, steps=1)
    x, y = batch(2)
    seeds = [11, 12]
    for block in TINY_ATTN[family]:
        before: list[torch.Tensor] = []
        after: list[torch.Tensor] = []
        module = model.net.get_submodule(f"{block}.attn.attn_drop")
        with attack.source_context(model):
            handles = [recorder(module, before, True), recorder(module, after, False)]
            attack.perturb(model, x, y, seeds)
            for h in handles:
                h.remove()
        (p,), (edited,) = before, after
        _, heads, rows, _ = p.shape
        salt = zlib.crc32(block.encode())
        m = multipliers(seeds, 0, salt, (heads, rows, rows), attack.r, p.device)
        assert m.min() >= 1 - attack.r and m.max() <= 1 + attack.r
        assert not torch.equal(m[0], m[1])  # each image its own M
        assert torch.equal(edited, torch.softmax(p * m, dim=-1))
        for b in range(2):  # the released per-head loop, one image at a time
            theirs = official.official_attention_map(p[b : b + 1], m[b])
            assert torch.equal(edited[b : b + 1], theirs)
        assert torch.allclose(edited.sum(-1), torch.ones(()), atol=1e-5)


def test_the_embedding_momentum_over_three_forwards():
    model = tiny("vit")
    attack = fpr("vit", steps=3)
    s, d = attack.scale, attack.mom_emb_decay
    assert (s, d) == (0.8, 0.3)
    x, y = batch(2)
    for site in ("blocks.0.attn", "blocks.1.mlp"):
        raw: list[torch.Tensor] = []
        acc: list[torch.Tensor] = []
        module = model.net.get_submodule(site)
        with attack.source_context(model):
            handles = [recorder(module, raw, True), recorder(module, acc, False)]
            attack.perturb(model, x, y, [5, 6])
            for h in handles:
                h.remove()
        assert len(raw) == len(acc) == 3  # the probe's forward is not recorded: it came before
        assert torch.equal(acc[0], s * raw[0])
        assert torch.equal(acc[1], d * acc[0] + s * raw[1])
        assert torch.equal(acc[2], d * acc[1] + s * raw[2])
        previous = None
        for t in range(3):
            previous = official.official_momentum(previous, raw[t], s, d)
            assert torch.equal(acc[t], previous)


@pytest.mark.parametrize("family", ["vit", "deit", "pit", "cait"])
def test_the_whole_attack_is_the_released_one_at_batch_1(family):
    model = tiny(family)
    attack = fpr(family, steps=3)
    x, y = batch(1, seed=7)
    seed = 1234

    def draws(step, block, shape, device):  # the port fed with our per-image draws
        return multipliers([seed], step, zlib.crc32(block.encode()), shape, attack.r, device)[0]

    with attack.source_context(model):
        ours = attack.perturb(model, x, y, [seed])
    theirs = official.official_attack(
        model,
        x,
        y,
        "deit" if family == "deit" else family,
        draws,
        steps=3,
        eps=attack.eps,
        alpha=attack.alpha,
        attn_blocks=tuple(TINY_ATTN[family]),
    )
    assert (ours - x).abs().max() > 1 / 255  # the attack moved the image
    # The same steps: the two ways of clamping to [0, 1] (ours (x + delta).clamp(0, 1) - x, the
    # released min(max(delta, -x), 1 - x)) differ by at most one float32 ulp, and never in
    # the saved 8-bit pixels.
    assert torch.allclose(ours, theirs, rtol=0, atol=1.2e-7)
    clean = (x * 255).round().to(torch.uint8)
    assert torch.equal(quantize(ours, clean, 16.0), quantize(theirs, clean, 16.0))


@pytest.mark.parametrize("family", ["vit", "pit", "cait"])
def test_batch_1_and_batch_3_give_the_same_pngs(family):
    assert_batch_invariant(fpr(family, steps=2), tiny(family))


def test_batch_invariance_with_the_modifiers_fpr_takes():
    patchout = {"enabled": True, "n_patches": 10, "patch_size": 16}
    on = {"enabled": True}
    assert_batch_invariant(fpr("vit", steps=2, di=on, ti=on, patchout=patchout), tiny("vit"))


def test_the_state_starts_fresh_for_every_batch():
    model = tiny("vit")
    attack = fpr("vit", steps=2)
    x, y = batch(2)
    other, other_y = batch(2, seed=9)
    with attack.source_context(model):
        first = attack.perturb(model, x, y, [1, 2])
        attack.perturb(model, other, other_y, [3, 4])
        again = attack.perturb(model, x, y, [1, 2])
        assert attack._state == {}
        # A forward outside the attack's loop sees the unchanged network.
        inside = model(x)
    assert torch.equal(first, again)
    previous = set_fused_attn(model.net, False)  # as inside the context, without the hooks
    assert torch.equal(inside, model(x))
    for module, flag in previous:
        module.fused_attn = flag
    # The released code's never-reset state would make the second run differ from the first.
    seed = 1

    def draws(step, block, shape, device):
        return multipliers([seed], step, zlib.crc32(block.encode()), shape, attack.r, device)[0]

    kept: dict = {}
    keys = {"steps": 2, "eps": attack.eps, "attn_blocks": tuple(TINY_ATTN["vit"])}
    leaked = [official.official_attack(model, x[:1], y[:1], "vit", draws, state=kept, **keys)]
    leaked.append(official.official_attack(model, x[:1], y[:1], "vit", draws, state=kept, **keys))
    assert not torch.equal(leaked[0], leaked[1])


@pytest.mark.parametrize("family", ["vit", "cait"])
def test_the_loop_and_hooks_never_sync(family):
    model = tiny(family)
    attack = fpr(family, steps=2)
    x, y = batch(2)
    with attack.source_context(model), forbid_host_sync() as calls:
        attack.perturb(model, x, y, [1, 2])
    assert calls == []
    assert attack.stats()["fpr_fired"]["attn_map"] == 2 * len(TINY_ATTN[family])


@pytest.mark.parametrize(
    "family,keys,match",
    [
        ("visformer", {}, "FPR does not support the visformer family"),
        ("resnet", {}, "FPR does not support the resnet family"),
        (None, {}, "no known family"),
        ("pit", {"preset": "vit"}, "a pit source takes attack.preset=pit"),
        ("vit", {"preset": "cait"}, "attack.preset=vit or deit"),
        ("vit", {"preset": "swin"}, "attack.preset='swin'"),
        ("vit", {"scale": 0}, r"attack.scale=0: choose auto .* > 0"),
        ("vit", {"mom_emb_decay": 1.5}, "attack.mom_emb_decay=1.5"),
        ("vit", {"attn_map_change_range": -1}, "attack.attn_map_change_range=-1"),
        ("vit", {"attn_map_change_range": "x"}, "is not a number"),
        ("vit", {"attn_blocks": "blocks.0"}, "list of block paths"),
        ("vit", {"attn_blocks": ["blocks.0", "blocks.0"]}, "without repeats"),
        ("vit", {"momentum_blocks": ["blocks 1"]}, "attack.momentum_blocks"),
        ("vit", {"si": {"enabled": True}}, "attack.si with attack=fpr"),
        ("cait", {"admix": {"enabled": True}}, "attack.admix with attack=fpr"),
        ("vit", {"attn_blocks": [], "momentum_blocks": []}, "that is attack=mi"),
    ],
)
def test_bad_settings_are_refused(family, keys, match):
    with pytest.raises(UserError, match=match):
        make("fpr", family, **keys)


def test_blocks_a_source_lacks_and_a_deit_without_its_preset_are_refused():
    cases = [
        (make("fpr", "vit"), "vit", r"attack.attn_blocks names blocks.4, blocks.9, blocks.11 "),
        (
            make("fpr", "pit", attn_blocks=[], momentum_blocks=["transformers.1.blocks.2"]),
            "pit",
            "attack.momentum_blocks names transformers.1.blocks.2",
        ),
        (make("fpr", "deit", attn_blocks=["blocks.0"]), "deit", "attack.preset=deit"),
    ]
    for attack, family, match in cases:
        with pytest.raises(UserError, match=match), attack.source_context(tiny(family)):
            pass
    with pytest.raises(RuntimeError, match="inside attack.source_context"):
        fpr("vit").perturb(tiny("vit"), *batch(1), [0])
