"""R&P: canvas size, the resized image's placement on the fill, and per-image draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgr_bench.defenses import RandomResizePad
from tgr_bench.errors import UserError


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Pixels in [0.6, 1]: never the fill value 0.5, so the fill can be told apart."""
    g = torch.Generator().manual_seed(seed)
    return 0.6 + 0.4 * torch.randint(0, 256, (n, 3, size, size), generator=g) / 255


@pytest.mark.parametrize(
    ("size", "canvas", "low"), [(224, 248, 224), (299, 331, 299), (32, 35, 32)]
)
def test_canvas_and_resize_range_keep_the_papers_ratios(size, canvas, low):
    rp = RandomResizePad()
    assert rp.sizes(size) == (low, canvas)
    drawn = [rp.draw(key, size) for key in range(400)]
    assert {r for r, _, _ in drawn} <= set(range(low, canvas))
    assert min(r for r, _, _ in drawn) == low and max(r for r, _, _ in drawn) == canvas - 1
    assert all(0 <= top <= canvas - r and 0 <= left <= canvas - r for r, top, left in drawn)
    # The extreme placements occur: offsets reach both 0 and canvas - r.
    assert any(top == 0 for _, top, _ in drawn) and any(t == canvas - r for r, t, _ in drawn)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_each_image_is_its_resize_placed_at_its_offset_on_the_fill(mode):
    x, keys = images(4, 32), [11, 12, 13, 14]
    rp = RandomResizePad(mode=mode)
    out = rp(x, keys)
    assert out.shape == (4, 3, 35, 35)
    for i, key in enumerate(keys):
        r, top, left = rp.draw(key, 32)
        if mode == "nearest":
            resized = F.interpolate(x[i : i + 1], size=(r, r), mode="nearest")[0]
        else:
            resized = F.interpolate(x[i : i + 1], size=(r, r), mode="bilinear")[0]
        assert torch.equal(out[i, :, top : top + r, left : left + r], resized)
        outside = torch.ones(35, 35, dtype=torch.bool)
        outside[top : top + r, left : left + r] = False
        assert torch.all(out[i][:, outside] == 0.5)


def test_nearest_resize_takes_source_pixel_floor_of_i_times_s_over_r():
    x, keys = images(1, 32, seed=4).expand(10, -1, -1, -1), list(range(10))
    rp = RandomResizePad()
    out = rp(x, keys)
    sizes = set()
    for i, key in enumerate(keys):
        r, top, left = rp.draw(key, 32)
        src = [j * 32 // r for j in range(r)]
        assert torch.equal(out[i, :, top : top + r, left : left + r], x[0][:, src][:, :, src])
        sizes.add(r)
    assert sizes == {32, 33, 34}


def test_draws_are_per_image_a_batch_of_three_equals_each_alone():
    x, keys = images(3, 32, seed=1), [7, 8, 9]
    rp = RandomResizePad()
    together = rp(x, keys)
    alone = torch.cat([rp(x[i : i + 1], [keys[i]]) for i in range(3)])
    assert torch.equal(together, alone)
    assert torch.equal(rp(x[[2, 0, 1]], [9, 7, 8]), together[[2, 0, 1]])


def test_keys_decide_the_draw():
    x = images(1, 32).expand(2, -1, -1, -1)
    out = RandomResizePad()(x, [1, 2])
    assert not torch.equal(out[0], out[1])
    assert torch.equal(RandomResizePad()(x, [1, 1])[0], out[0])


def test_keys_are_required():
    x = images(2, 32)
    with pytest.raises(ValueError, match="randomized: pass one integer key per image"):
        RandomResizePad()(x)
    with pytest.raises(ValueError, match="got 1 keys for 2 images"):
        RandomResizePad()(x, [1])


def test_fill_and_scales_are_settings():
    x = images(1, 32)
    out = RandomResizePad(min_scale=1.5, max_scale=2.0, fill=0.0)(x, [3])
    assert out.shape[-1] == 64
    r = RandomResizePad(min_scale=1.5, max_scale=2.0).draw(3, 32)[0]
    assert 48 <= r < 64 and (out == 0).sum() == 3 * (64 * 64 - r * r)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"min_scale": 1.2, "max_scale": 1.1}, "max_scale=1.1 must exceed"),
        ({"max_scale": 5}, r"max_scale=5: choose the canvas scale in \[0.1, 4\]"),
        ({"fill": 1.5}, r"fill=1.5: choose the padding value in \[0, 1\]"),
        ({"mode": "bicubic"}, "mode='bicubic': choose one of"),
        ({"min_scale": "1"}, "is not a number"),
    ],
)
def test_rp_refuses_bad_settings(settings, match):
    with pytest.raises(UserError, match=match):
        RandomResizePad(**settings)


def test_rp_refuses_scales_that_leave_nothing_to_draw():
    with pytest.raises(UserError, match="leave no size to draw"):
        RandomResizePad(max_scale=1.01)(images(1, 32), [0])
