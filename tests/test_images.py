"""Saved PNGs: nearest 8-bit level, within eps after rounding, written atomically, read back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tgr_bench.data import read_image
from tgr_bench.images import quantize, save_png


def test_rounds_to_nearest_level_not_truncates():
    clean = torch.full((1, 3, 1, 2), 100, dtype=torch.uint8)
    adv = torch.tensor([100.6, 99.4]).div(255).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = quantize(adv, clean, 16)
    assert out[0, 0, 0].tolist() == [101, 99]


def test_rounding_past_eps_is_projected_back():
    clean = (
        torch.tensor([10, 10, 200, 0, 255], dtype=torch.uint8).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    )
    # 16.6 levels away rounds to 17, one past eps; the last two try to leave [0, 255].
    adv = (clean.float() + torch.tensor([16.6, -16.6, 16.49, -3.0, 20.0]).view(1, 1, 1, 5)) / 255
    out = quantize(adv, clean, 16)
    assert out[0, 0, 0].tolist() == [26, 0, 216, 0, 255]
    assert (out.int() - clean.int()).abs().max() <= 16


def test_fractional_eps_allows_only_whole_levels_inside_it():
    clean = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    out = quantize(clean.float() / 255 + 4.5 / 255, clean, 4.5)
    assert (out.int() - 128).max() == 4


def test_png_round_trip_and_no_leftover_temp_files(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 17, 23), generator=g, dtype=torch.uint8)
    path = tmp_path / "sub" / "a.png"
    save_png(img, path)
    assert torch.equal(read_image(path), img)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import os

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    from tgr_bench.errors import UserError

    with pytest.raises(UserError, match="No space left"):
        save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), tmp_path / "b.png")
    assert list(tmp_path.iterdir()) == []
