"""DI, TI, SI and Admix against docs/baselines.md section 7: each against an independent
computation, per-image draws (batch invariance, seeded reproducibility), TGR acting in every copy,
and the labels and parameters they add (or do not add, when off)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.attacks.support import assert_batch_invariant, pngs, pool_of
from tests.tiny import FAMILY, batch, tiny
from tgr_bench.attacks import build_attack
from tgr_bench.attacks.draws import mix, randint, uniform
from tgr_bench.attacks.modifiers import DI, TI, Admix
from tgr_bench.errors import UserError


def on(name: str, *modifiers: str, family: str = "vit", **settings) -> object:
    """`name` with `modifiers` on, for a source of `family` (a tests/tiny name)."""
    cfg = {"name": name, "steps": 3, **settings}
    for m in modifiers:
        cfg[m] = {"enabled": True, **cfg.get(m, {})}
    return build_attack(cfg, FAMILY[family])


# ---- TI -----------------------------------------------------------------------------------------
def test_ti_equals_a_convolution_written_out_by_hand():
    size, nsig = 5, 2.0
    pdf = [math.exp(-(t**2) / 2) for t in (nsig * (2 * i / (size - 1) - 1) for i in range(size))]
    kernel = [[a * b for b in pdf] for a in pdf]
    total = sum(map(sum, kernel))
    kernel = [[v / total for v in row] for row in kernel]
    g = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros_like(g)
    for b in range(2):
        for c in range(3):
            for i in range(7):
                for j in range(6):
                    acc = 0.0
                    for u in range(size):
                        for v in range(size):
                            ii, jj = i + u - size // 2, j + v - size // 2
                            if 0 <= ii < 7 and 0 <= jj < 6:  # zero padding
                                acc += kernel[u][v] * float(g[b, c, ii, jj])
                    expected[b, c, i, j] = acc
    assert torch.allclose(TI(size=size, nsig=nsig).apply(g), expected, atol=1e-6)


def test_ti_smooths_the_gradient_before_the_momentum_update():
    model = tiny("vit")
    x, y = batch(2)
    plain, smoothed = on("mi"), on("mi", "ti", ti={"size": 7})
    delta = torch.zeros_like(x)
    g = plain.input_gradient(model, x, delta, y, 0, [0, 1])
    # One step by hand: smooth, normalize per image, take the sign.
    step = TI(size=7).apply(g)
    expected = x + smoothed.alpha * torch.sign(step / step.abs().mean((1, 2, 3), keepdim=True))
    expected = (expected - x).clamp(-smoothed.eps, smoothed.eps).add(x).clamp(0, 1)
    one = on("mi", "ti", ti={"size": 7}, steps=1, alpha=smoothed.alpha_levels)
    assert torch.allclose(one.perturb(model, x, y, [0, 1]), expected, atol=1e-6)


# ---- SI -----------------------------------------------------------------------------------------
def grad_at(model, inputs_of, x, y):
    delta = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model(inputs_of(x + delta)), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, delta)
    return g


def test_si_is_the_mean_gradient_over_scaled_copies():
    model = tiny("vit")
    x, y = batch(3)
    attack = on("mi", "si", si={"m": 4})
    got = attack.input_gradient(model, x, torch.zeros_like(x), y, 0, [0, 1, 2])
    hand = sum(grad_at(model, lambda z, i=i: z / 2**i, x, y) for i in range(4)) / 4
    assert torch.allclose(got, hand, atol=1e-5, rtol=1e-4)
    model_space = on("mi", "si", si={"m": 3, "space": "model"})
    got = model_space.input_gradient(model, x, torch.zeros_like(x), y, 0, [0, 1, 2])
    mean = model.mean
    hand = sum(grad_at(model, lambda z, i=i: mean + (z - mean) / 2**i, x, y) for i in range(3))
    assert torch.allclose(got, hand / 3, atol=1e-5, rtol=1e-4)


def test_tgr_acts_in_every_copy():
    """The copies' batched pass equals a hand loop over the copies with TGR's hooks on."""
    model = tiny("deit")
    x, y = batch(2)
    batched = on("tgr", "si", si={"m": 3})
    loop = on("tgr")
    with batched.source_context(model):
        got = batched.input_gradient(model, x, torch.zeros_like(x), y, 0, [0, 1])
    with loop.source_context(model):
        hand = sum(grad_at(model, lambda z, i=i: z / 2**i, x, y) for i in range(3)) / 3
        assert loop.fired["attn"] > 0
    assert torch.allclose(got, hand, atol=1e-5, rtol=1e-4)
    without = on("mi", "si", si={"m": 3}).input_gradient(
        model, x, torch.zeros_like(x), y, 0, [0, 1]
    )
    assert not torch.allclose(got, without, atol=1e-4)  # the hooks did act


# ---- DI -----------------------------------------------------------------------------------------
def test_di_on_one_image_equals_its_definition():
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    di = DI(p=1.0, rate=1.3)
    key = 12345
    r = randint(mix(key, 2), 20, 26)  # r in [S, floor(1.3 S)) = [20, 26)
    top, left = randint(mix(key, 3), 0, 26 - r), randint(mix(key, 4), 0, 26 - r)
    small = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
    canvas = torch.zeros(1, 3, 26, 26)
    canvas[:, :, top : top + r, left : left + r] = small
    expected = F.interpolate(canvas, size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(di.apply(x, [key]), expected, atol=1e-6)
    assert torch.equal(DI(p=0.0).apply(x, [key]), x)  # never transformed


@pytest.mark.parametrize("rate", [1.3, 0.8])  # enlarging (pad, resize back) and shrinking
def test_di_on_many_images_equals_the_definition_image_by_image(rate):
    x = torch.rand(12, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    di, keys = DI(p=0.7, rate=rate), [mix(11, i) for i in range(12)]
    low, high = sorted((20, math.floor(20 * rate)))

    def definition(z: torch.Tensor) -> torch.Tensor:
        out = []
        for i, key in enumerate(keys):
            one = z[i : i + 1]
            if uniform(mix(key, 1)) < 0.7:
                r = randint(mix(key, 2), low, high)
                top = randint(mix(key, 3), 0, high - r)
                left = randint(mix(key, 4), 0, high - r)
                small = F.interpolate(one, size=(r, r), mode="bilinear", align_corners=False)
                one = F.pad(small, (left, high - r - left, top, high - r - top))
                if high != 20:
                    one = F.interpolate(one, size=(20, 20), mode="bilinear", align_corners=False)
            out.append(one)
        return torch.cat(out)

    leaf = x.clone().requires_grad_(True)
    got, expected = di.apply(leaf, keys), definition(leaf)
    assert torch.allclose(got, expected, atol=1e-6)
    # Gradients too: the attack differentiates through DI.
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    (g,) = torch.autograd.grad((got * weights).sum(), leaf)
    (h,) = torch.autograd.grad((expected * weights).sum(), leaf)
    assert torch.allclose(g, h, atol=1e-6)


def test_di_draws_are_per_image_and_per_key():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    di = DI(p=0.5, rate=1.5)
    keys = [mix(7, i) for i in range(6)]
    together = di.apply(x, keys)
    alone = torch.cat([di.apply(x[i : i + 1], keys[i : i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=0)
    assert torch.equal(di.apply(x, keys), together)  # the same keys, the same draws
    coins = [uniform(mix(k, 1)) < 0.5 for k in keys]
    assert 0 < sum(coins) < 6  # some transformed, some not, at p = 0.5
    for i, coin in enumerate(coins):
        assert torch.equal(together[i], x[i]) != coin


def test_every_vmi_neighbour_and_copy_draws_its_own_di(monkeypatch):
    seen: list[list[int]] = []
    real = DI.apply
    monkeypatch.setattr(
        DI, "apply", lambda self, x, keys: seen.append(list(keys)) or real(self, x, keys)
    )
    model = tiny("vit")
    x, y = batch(2)
    attack = on("vmi", "di", "si", n_samples=3, si={"m": 2}, steps=1)
    attack.perturb(model, x, y, [5, 6])
    keys = [k for call in seen for k in call]
    # 2 images x 2 copies at the point itself, then x 3 neighbours: all distinct.
    assert len(keys) == 2 * 2 + 2 * 3 * 2 and len(set(keys)) == len(keys)


# ---- Admix --------------------------------------------------------------------------------------
def test_admix_partners_are_other_images_of_the_whole_set():
    admix = Admix(m1=2, m2=3)
    for own in range(5):
        idx = admix.partner_index([own] * 50, [mix(own, k) for k in range(50)], 5)
        assert own not in idx and set(idx) == set(range(5)) - {own}
    with pytest.raises(UserError, match="at least two images"):
        admix.partner_index([0], [1], 1)


def admix_gradient(m1: int, m2: int) -> tuple:
    """(model, x, y, the Admix gradient at step 0 of 2 images, their partners (2, m2, 3, H, W))
    with eta 0.3 and a pool of 5 images."""
    model = tiny("vit")
    x, y = batch(2)
    attack = on("mi", "admix", admix={"m1": m1, "m2": m2, "eta": 0.3})
    pool = pool_of(5)
    attack.use_pool(pool)
    got = attack.input_gradient(model, x, torch.zeros_like(x), y, 0, [0, 1], ids=[0, 1])
    index = attack.admix.partner_index([0, 1], [mix(s, 0) for s in (0, 1)], 5)
    partners = pool.load(index).float().div(255).view(2, m2, *x.shape[1:])
    return model, x, y, got, partners


def test_admix_is_the_mean_over_mixed_scaled_copies():
    model, x, y, got, partners = admix_gradient(m1=2, m2=2)
    hand = 0
    for j in range(2):
        for i in range(2):
            hand = hand + grad_at(
                model, lambda z, j=j, i=i: (z + 0.3 * partners[:, j]) / 2**i, x, y
            )
    assert torch.allclose(got, hand / 4, atol=1e-5, rtol=1e-4)


class RunsOutOfMemory(torch.nn.Module):
    """The tiny model behind a device that holds at most `limit` inputs per pass: a larger
    pass raises the error CUDA raises, before any work."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []
        self.mean = model.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test device)")
        return self.model(x)


@pytest.mark.parametrize("family,name", [("vit", "mi"), ("deit", "tgr")])
def test_copies_split_in_halves_on_out_of_memory(family, name):
    """SI's 4 copies of one image on a device that holds 2 inputs: the pass is retried with
    2 copies, the gradient equals the single pass, and the split is recorded. PatchOut's L2
    term is in the loss, so it must count once, not once per pass. With several images the
    error goes to the crafting loop, whose halving of the batch changes no image's result."""
    model = tiny(family)
    x, y = batch(2)
    x, y = x[:1], y[:1]
    settings = {"si": {"m": 4}, "patchout": {"enabled": True, "l2": 0.5, "n_patches": 4}}
    whole, split = on(name, "si", **settings), on(name, "si", **settings)
    delta = 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with whole.source_context(model):
        expected = whole.input_gradient(model, x, delta, y, 0, [0])
    small = RunsOutOfMemory(model, limit=2)
    with split.source_context(model):
        got = split.input_gradient(small, x, delta, y, 0, [0])
        again = split.input_gradient(small, x, delta, y, 1, [0])
    assert small.sizes == [4, 2, 2, 2, 2]  # one failed pass, then halves; the split is kept
    assert split.copy_chunk == 2 and split.stats()["copies_per_pass"] == 2
    assert "copies_per_pass" not in whole.stats()
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(again, got)  # step 1: other PatchOut masks
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one copy per pass is the floor
        on(name, "si", **settings).input_gradient(RunsOutOfMemory(model, 0), x, delta, y, 0, [0])
    two, (x2, y2) = RunsOutOfMemory(model, limit=4), batch(2)  # 2 images x 4 copies
    with pytest.raises(torch.cuda.OutOfMemoryError):
        on(name, "si", **settings).input_gradient(two, x2, torch.zeros_like(x2), y2, 0, [0, 1])
    assert two.sizes == [8]  # not split here


def test_admix_with_one_partner_and_one_scale_still_mixes():
    """m1 = m2 = 1 is one copy per image, and still the gradient at x + eta * x', not at x."""
    model, x, y, got, partners = admix_gradient(m1=1, m2=1)
    hand = grad_at(model, lambda z: z + 0.3 * partners[:, 0], x, y)
    assert torch.allclose(got, hand, atol=1e-5, rtol=1e-4)
    plain = on("mi").input_gradient(model, x, torch.zeros_like(x), y, 0, [0, 1])
    assert not torch.allclose(got, plain, atol=1e-4)


@pytest.mark.parametrize(
    "rate,size,match",
    [
        (1.0, (224, 224), "would do nothing. Choose a rate of at least 1.004"),
        (1.004, (224, 224), "would do nothing"),
        (0.001, (224, 224), "to 0 pixels"),
        (1.1, (224, 200), "needs square images; this data set stores 224x200"),
    ],
)
def test_di_settings_that_cannot_act_are_refused(rate, size, match):
    with pytest.raises(UserError, match=match):
        DI(rate=rate).check_size(*size)
    DI(rate=1.1).check_size(224, 224)  # enlarging and shrinking rates that act are fine
    DI(rate=0.9).check_size(224, 224)


def test_modifier_refusals_come_before_any_work(make_cfg, tmp_path):
    """A DI rate that would do nothing on the data's 224-pixel images is refused by the plan:
    no run directory, no model built."""
    from tgr_bench.pipeline import run

    out = tmp_path / "run"
    with pytest.raises(UserError, match="DI would do nothing"):
        run(make_cfg("experiment=smoke", "attack.di.enabled=true", "attack.di.rate=1.0"), out)
    assert not out.exists()


# ---- batch 1 equals batch N, for every modifier and with TGR on -------------------------------
@pytest.mark.parametrize(
    "name,family,modifiers",
    [
        ("mi", "vit", ("di",)),
        ("mi", "vit", ("ti",)),
        ("mi", "vit", ("si",)),
        ("mi", "vit", ("admix",)),
        ("tgr", "pit", ("di",)),
        ("tgr", "vit", ("si", "di", "ti")),
        ("tgr", "deit", ("admix", "di")),
        ("vmi", "vit", ("di",)),
    ],
)
def test_batch_of_one_equals_batch_of_three(name, family, modifiers):
    settings = {"n_samples": 2} if name == "vmi" else {}
    small = {"si": {"m": 3}, "admix": {"m1": 2, "m2": 2}}  # fewer copies: the same code paths
    settings |= {m: small[m] for m in modifiers if m in small}
    attack = on(name, *modifiers, family=family, **settings)
    assert_batch_invariant(attack, tiny(family))


def test_same_seed_same_pngs_other_seed_other_pngs():
    model = tiny("vit")
    x, y = batch(2)
    attack = on("mi", "di", "admix", admix={"m1": 2, "m2": 2})
    attack.use_pool(pool_of(5))
    a = pngs(attack, model, x, y, [1, 2], [0, 1])
    assert torch.equal(a, pngs(attack, model, x, y, [1, 2], [0, 1]))
    assert not torch.equal(a, pngs(attack, model, x, y, [3, 4], [0, 1]))


def test_admix_copies_in_each_space_by_hand():
    """One pixel, one channel at 0.6, partner 0.1, eta 0.5, m1 = 2, model mean 0.5.
    pixels: (0.6 + 0.5 * 0.1) / 2^i = 0.65, 0.325 (toward black).
    model:  0.5 + ((0.6 - 0.5) + 0.5 * (0.1 - 0.5)) / 2^i = 0.5 - 0.1 / 2^i = 0.4, 0.45 (toward
    the mean; in (p - 0.5) / 0.5, i.e. the original's [-1, 1]: -0.2, -0.1)."""
    x = torch.full((1, 3, 1, 1), 0.6)
    partners = torch.full((1, 1, 3, 1, 1), 0.1)
    mean = torch.tensor([0.5, 0.25, 0.0])
    pixels = Admix(m1=2, m2=1, eta=0.5).copies(x, partners, mean)
    assert torch.allclose(pixels[0, :, 0].flatten(), torch.tensor([0.65, 0.325]))
    assert torch.equal(pixels, Admix(m1=2, m2=1, eta=0.5).copies(x, partners))  # mean unused
    model = Admix(m1=2, m2=1, eta=0.5, space="model").copies(x, partners, mean)
    assert model.shape == (1, 2, 3, 1, 1)
    assert torch.allclose(model[0, :, 0].flatten(), torch.tensor([0.4, 0.45]))
    # Channel with mean 0.25: 0.25 + (0.35 - 0.075) / 2^i; mean 0: the pixel space.
    assert torch.allclose(model[0, :, 1].flatten(), torch.tensor([0.525, 0.3875]))
    assert torch.allclose(model[0, :, 2], pixels[0, :, 2])
    # In the model's normalized input z = (p - mean) / std the copies are (z + eta z') / 2^i.
    std = torch.tensor([0.5, 0.2, 0.3]).view(1, 1, 3, 1, 1)
    m = mean.view(1, 1, 3, 1, 1)
    z, zp = (x.unsqueeze(1) - m) / std, (partners - m) / std
    halves = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1, 1)
    assert torch.allclose((model - m) / std, (z + 0.5 * zp) * halves, atol=1e-6)
    with pytest.raises(ValueError, match="mean"):
        Admix(space="model").copies(x, partners)


def test_admix_space_in_params_only_when_not_the_default():
    plain = on("mi", "admix").params()
    assert "admix_space" not in plain and plain["admix_eta"] == 0.2
    assert on("mi", "admix", admix={"space": "pixels"}).params() == plain
    assert on("mi", "admix", admix={"space": "model"}).params() == {**plain, "admix_space": "model"}
    with pytest.raises(UserError, match="attack.admix.space"):
        build_attack({"name": "mi", "admix": {"enabled": False, "space": "model"}})
    with pytest.raises(UserError, match="space"):
        build_attack({"name": "mi", "admix": {"enabled": True, "space": "tf"}})


# ---- labels, parameters, refusals ---------------------------------------------------------------
def test_labels_name_every_active_modifier_in_a_fixed_order():
    assert on("tgr", "ti", "di", patchout={"enabled": True}).label == "tgr_patchout_di_ti"
    assert on("mi", "admix").label == "mi_admix"
    plain, with_off = build_attack({"name": "mi"}), build_attack({"name": "mi", "ti": {}})
    assert plain.params() == with_off.params() and with_off.label == "mi"
    # A disabled modifier's setting would silently not apply: refused, naming the flag.
    with pytest.raises(UserError, match="attack.di.p=0.9 has no effect while attack.di.enabled"):
        build_attack({"name": "mi", "di": {"enabled": False, "p": 0.9}})
    params = on("mi", "di", "si").params()
    assert {params["di_p"], params["di_rate"], params["si_m"], params["si_space"]} == {
        0.5,
        1.1,
        5,
        "pixels",
    }


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"si": {"enabled": True}, "admix": {"enabled": True}}, "enable one of them"),
        ({"di": {"enabled": True, "p": 2}}, "probability"),
        ({"ti": {"enabled": True, "size": 4}}, "odd kernel size"),
        ({"si": {"enabled": True, "space": "tf"}}, "space"),
        ({"admix": {"enabled": True, "eta": "x"}}, "not a number"),
        ({"di": {"enabled": True, "pp": 1}}, "there is no key attack.di.pp"),
        ({"di": {"enabled": True, "rate": 100}}, "in \\(0, 2\\]"),
        ({"di": {"enabled": "no"}}, "attack.di.enabled='no': use true or false"),
        ({"patchout": {"enabled": "off"}}, "attack.patchout.enabled='off': use true or false"),
        ({"di": {"enabled": False, "p": 7}}, "probability"),  # checked even when off
        ({"patchout": {"enabled": False, "mask": "x"}}, "attack.patchout.mask"),
    ],
)
def test_bad_modifier_settings(cfg, match):
    with pytest.raises(UserError, match=match):
        build_attack({"name": "mi", **cfg})


@pytest.mark.parametrize(
    "name,keys,attr,sizes",
    [
        ("vmi", {"n_samples": 4}, "chunk", [1, 4, 2, 2]),  # the gradient at x, then neighbours
        ("gns", {"hfa": {"n": 4}}, "hfa_chunk", [4, 2, 2]),
    ],
)
def test_neighbours_and_samples_split_in_halves_on_out_of_memory(name, keys, attr, sizes):
    """VMI's neighbours and HFA's samples of one image share the copies' halving: a device that
    holds 2 inputs gets passes of 2, with the gradient of the single pass."""
    model = tiny("vit")
    x, y = batch(1)
    delta = 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    whole, split = on(name, **keys), on(name, **keys)
    with whole.source_context(model):
        expected = whole.input_gradient(model, x, delta, y, 0, [0])
    small = RunsOutOfMemory(model, limit=2)
    with split.source_context(model):
        got = split.input_gradient(small, x, delta, y, 0, [0])
    assert small.sizes == sizes and getattr(split, attr) == 2
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
