"""Pixel deflection: the swaps stay within the window, apply in order as a slow reference does,
are the image's own, and follow a guide map; R-CAM against a computation by hand."""

from __future__ import annotations

import pytest
import timm
import torch

from tgr_bench.defenses import ActivationGuide, PixelDeflection
from tgr_bench.defenses.pixel_deflection import robust_activation_map
from tgr_bench.defenses.wavelet import denoise_ycbcr
from tgr_bench.errors import UserError
from tgr_bench.models import PixelModel


def images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g) / 255


def unique_pixels(size: int = 24) -> torch.Tensor:
    """Every entry different, so a moved value tells where it came from."""
    return (torch.arange(3 * size * size, dtype=torch.float64) / (3 * size * size)).view(
        1, 3, size, size
    )


def sequential_reference(x: torch.Tensor, plan: list) -> torch.Tensor:
    out = x.clone()
    for c, row, col, src_row, src_col in plan:
        out[c, row, col] = out[c, src_row, src_col]
    return out


def test_draws_stay_in_the_image_and_in_the_window_and_take_turns_over_channels():
    pd = PixelDeflection(deflections=300, window=3)
    plan = pd.draws(key=5, shape=(3, 10, 12), skip=None)
    assert len(plan) == 300
    assert [c for c, *_ in plan] == [t % 3 for t in range(300)]
    for _, row, col, src_row, src_col in plan:
        assert 0 <= row < 10 and 0 <= col < 12 and 0 <= src_row < 10 and 0 <= src_col < 12
        assert abs(src_row - row) <= 3 and abs(src_col - col) <= 3
    offsets = {(sr - r, sc - c) for _, r, c, sr, sc in plan}
    assert len(offsets) > 30  # the window is covered, not one fixed offset


@pytest.mark.parametrize("window", [1, 4, 10])
def test_deflection_applies_the_swaps_in_order(window):
    x = images(2, seed=window)
    pd = PixelDeflection(deflections=150, window=window, sigma=0.0)
    out = pd(x, keys=[3, 4])
    for i, key in enumerate([3, 4]):
        plan = pd.draws(key, (3, 24, 24), None)
        assert torch.equal(out[i], sequential_reference(x[i], plan))
        assert (out[i] != x[i]).sum() <= 150


def test_one_deflection_moves_one_value_from_within_the_window():
    x = unique_pixels()
    for key in range(20):
        out = PixelDeflection(deflections=1, window=2, sigma=0.0)(x, [key])
        changed = (out != x).nonzero().tolist()
        assert len(changed) <= 1  # an offset of (0, 0) changes nothing
        for _, c, row, col in changed:
            (_, c2, r2, c3), *_ = (x == out[0, c, row, col]).nonzero().tolist()
            assert c2 == c and abs(r2 - row) <= 2 and abs(c3 - col) <= 2


def test_deflection_then_the_wavelet_denoiser():
    x = images(2, seed=7)
    plain = PixelDeflection(sigma=0.0)(x, [1, 2])
    out = PixelDeflection()(x, [1, 2])
    assert torch.equal(out, denoise_ycbcr(plain, 0.04))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_draws_are_per_image_a_batch_of_three_equals_each_alone():
    x, keys = images(3, seed=2), [10, 11, 12]
    pd = PixelDeflection(deflections=100, window=5)
    together = pd(x, keys)
    alone = torch.cat([pd(x[i : i + 1], [keys[i]]) for i in range(3)])
    assert torch.equal(together, alone)
    assert not torch.equal(pd(x[:1], [10]), pd(x[:1], [13]))


def test_a_guide_map_decides_which_pixels_may_move():
    x = images(2, seed=3)
    protected = torch.ones(2, 24, 24)
    protected[:, 8:16, 8:16] = 0.0  # skip probability 1 everywhere except this square

    def guide(images: torch.Tensor) -> torch.Tensor:
        return protected

    pd = PixelDeflection(deflections=60, window=2, guide=guide)
    for key in (1, 2):
        plan = pd.draws(key, (3, 24, 24), protected[0].numpy())
        assert all(8 <= row < 16 and 8 <= col < 16 for _, row, col, _, _ in plan)
    out = PixelDeflection(deflections=60, window=2, sigma=0.0, guide=guide)(x, [1, 2])
    changed = (out != x).any(1)
    assert changed[:, 8:16, 8:16].any() and not changed[:, :7].any() and not changed[:, 17:].any()
    assert pd.params()["pd_map"] == "custom"


def test_a_guide_that_skips_everything_is_refused():
    pd = PixelDeflection(deflections=5, guide=lambda images: torch.ones(1, 8, 8))
    with pytest.raises(UserError, match="skips every pixel"):
        pd(images(1, size=8), [0])


def test_keys_are_required():
    with pytest.raises(ValueError, match="randomized"):
        PixelDeflection()(images(1))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"deflections": 0}, r"deflections=0: choose the swaps per image"),
        ({"window": 0}, r"window=0: choose the swap distance"),
        ({"sigma": -0.1}, r"sigma=-0.1: choose the denoiser's noise level in \[0, 1\]"),
        ({"guide": "rcam"}, "give a callable map"),
    ],
)
def test_pd_refuses_bad_settings(settings, match):
    with pytest.raises(UserError, match=match):
        PixelDeflection(**settings)


def unit(m: torch.Tensor) -> torch.Tensor:
    return (m - m.min()) / (m.max() - m.min())


def test_robust_activation_map_by_hand():
    features = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[0.0, 3.0], [1.0, 0.0]]]])  # (1,2,2,2)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 classes
    logits = torch.tensor([[0.1, 0.5, 0.9]])  # top 3: class 2, then 1, then 0
    cam = {c: weight[c, 0] * features[0, 0] + weight[c, 1] * features[0, 1] for c in range(3)}
    merged = ((1.2 * unit(cam[0]) + unit(cam[1])) / 2 + unit(cam[2])) / 2
    out = robust_activation_map(features, weight, logits, (2, 2), top_k=3)
    assert torch.allclose(out[0], unit(merged))
    two = robust_activation_map(features, weight, logits, (2, 2), top_k=2)
    assert torch.allclose(two[0], unit((1.2 * unit(cam[1]) + unit(cam[2])) / 2))
    assert robust_activation_map(features, weight, logits, (6, 6)).shape == (1, 6, 6)


def test_activation_guide_maps_images_through_a_timm_cnn():
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    guide = ActivationGuide(PixelModel(net, (0.5,) * 3, (0.25,) * 3, 64), top_k=3)
    maps = guide(images(2, size=24))
    assert maps.shape == (2, 24, 24)
    assert torch.allclose(maps.amin((1, 2)), torch.zeros(2))
    assert torch.allclose(maps.amax((1, 2)), torch.ones(2))
    pd = PixelDeflection(deflections=20, guide=guide)
    assert pd.params()["pd_map"] == "rcam"
    assert pd(images(2, size=24), [1, 2]).shape == (2, 3, 24, 24)
