"""Both data layouts, and each kind of bad data input as a clear error naming the problem."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import write_images
from tgr_bench.data import adversarial_pixels, load_folder, read_image
from tgr_bench.errors import UserError


def test_csv_layout(csv_set: Path):
    data = load_folder(csv_set)
    assert data.layout == "csv"
    assert data.stems == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 6)]
    assert data.labels.tolist() == [0, 37, 74, 111, 148]
    images = data.load()
    assert images.shape == (5, 3, 64, 64) and images.dtype == torch.uint8 and data.size == (64, 64)
    # The stored pixels, unchanged.
    assert torch.equal(images[2], read_image(csv_set / f"{data.stems[2]}.png"))


def test_json_layout_with_labels_one_level_above(json_set: Path):
    data = load_folder(json_set)
    assert data.layout == "json"
    assert data.labels.tolist() == [0, 37, 74, 111, 148]


def test_json_layout_from_repository_root_and_labels_beside(json_set: Path, tmp_path: Path):
    assert load_folder(json_set.parent).labels.tolist() == [0, 37, 74, 111, 148]
    beside = tmp_path / "beside"
    beside.mkdir()
    for p in json_set.iterdir():
        (beside / p.name).write_bytes(p.read_bytes())
    (beside / "image_name_to_class_id_and_name.json").write_bytes(
        (json_set.parent / "image_name_to_class_id_and_name.json").read_bytes()
    )
    assert len(load_folder(beside)) == 5


def test_limit_takes_the_first_images_by_name(csv_set: Path):
    data = load_folder(csv_set, limit=2)
    assert data.stems == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002"]


def test_missing_folder(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist.*data.root"):
        load_folder(tmp_path / "nope")


def test_folder_without_labels(tmp_path: Path):
    write_images(tmp_path / "x", 2)
    with pytest.raises(UserError, match="No labels found"):
        load_folder(tmp_path / "x")


def test_truncated_image_is_named(csv_set: Path):
    victim = csv_set / "ILSVRC2012_val_00000003.png"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(UserError, match="ILSVRC2012_val_00000003.png"):
        load_folder(csv_set)


def test_damage_inside_a_png_is_found_when_the_set_loads(csv_set: Path):
    """Checked up front without decoding any pixels: a flipped byte in the compressed data
    fails its chunk checksum, so the run stops before any attack work, naming the file."""
    victim = csv_set / "ILSVRC2012_val_00000004.png"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match="Cannot read image .*ILSVRC2012_val_00000004.png"):
        load_folder(csv_set)


def test_not_an_image_is_named(csv_set: Path):
    (csv_set / "ILSVRC2012_val_00000002.png").write_text("hello")
    with pytest.raises(UserError, match="Cannot read image .*ILSVRC2012_val_00000002.png"):
        load_folder(csv_set)


def test_grayscale_image_is_refused(csv_set: Path):
    Image.new("L", (64, 64)).save(csv_set / "ILSVRC2012_val_00000001.png")
    with pytest.raises(UserError, match="mode 'L'"):
        load_folder(csv_set)


@pytest.mark.parametrize(
    "label,match", [("1000", "outside 0..999"), ("-1", "outside"), ("cat", "not an integer")]
)
def test_bad_label(csv_set: Path, label: str, match: str):
    rows = list(csv.reader((csv_set / "labels.csv").read_text().splitlines()))
    rows[2][1] = label
    with open(csv_set / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(UserError, match=match):
        load_folder(csv_set)


def test_json_label_outside_range(json_set: Path):
    path = json_set.parent / "image_name_to_class_id_and_name.json"
    table = json.loads(path.read_text())
    table["ILSVRC2012_val_00000004.JPEG"]["class_id"] = 1000
    path.write_text(json.dumps(table))
    with pytest.raises(UserError, match="ILSVRC2012_val_00000004.JPEG"):
        load_folder(json_set)


def test_image_without_label(json_set: Path):
    write_images(json_set, 6, seed=3)  # adds ILSVRC2012_val_00000006 with no json entry
    with pytest.raises(UserError, match="have no label"):
        load_folder(json_set)


def test_image_missing_from_labels_csv_is_never_silently_dropped(csv_set: Path):
    for i in (6, 7, 8):  # three images in the folder that labels.csv does not list
        write_images(csv_set / "extra", 8, seed=i)
        (csv_set / "extra" / f"ILSVRC2012_val_{i:08d}.png").rename(
            csv_set / f"ILSVRC2012_val_{i:08d}.png"
        )
    with pytest.raises(UserError, match=r"3 images .* have no label .*00000006.*allow_unlabeled"):
        load_folder(csv_set)
    data = load_folder(csv_set, allow_unlabeled=True)
    assert len(data) == 5 and data.unlabeled_skipped == 3
    assert "ILSVRC2012_val_00000006" not in data.stems


def test_listed_file_missing(csv_set: Path):
    (csv_set / "ILSVRC2012_val_00000005.png").unlink()
    with pytest.raises(UserError, match="missing"):
        load_folder(csv_set)


def test_duplicate_stems_across_extensions(csv_set: Path):
    write_images(csv_set, 1, ext=".jpg")
    with pytest.raises(UserError, match="share the name"):
        load_folder(csv_set)


def test_mixed_sizes(csv_set: Path):
    write_images(csv_set, 1, size=32)
    with pytest.raises(UserError, match="differ in size"):
        load_folder(csv_set)


def test_adversarial_folder_must_cover_every_clean_image(csv_set: Path, tmp_path: Path):
    clean = load_folder(csv_set)
    adv = tmp_path / "adv"
    write_images(adv, 4)
    with pytest.raises(UserError, match="1 of 5 clean images have no adversarial image"):
        adversarial_pixels(adv, clean)
    write_images(adv, 5)
    pixels = adversarial_pixels(adv, clean)
    assert pixels.load(range(5)).shape == clean.load().shape
    assert torch.equal(pixels.load([2])[0], read_image(adv / f"{clean.stems[2]}.png"))
    write_images(adv, 5, size=32)  # now the wrong size
    with pytest.raises(UserError, match="is 32x32, its clean image is 64x64"):
        adversarial_pixels(adv, clean)


# ---- Admix's partner pool: the whole listing, checked and hashed ------------------------------
def test_admix_pool_beyond_the_limit_is_checked_and_hashed(make_cfg, csv_set: Path, tmp_path):
    """The images beyond data.limit are Admix's partners too: a change there changes an Admix
    run's data digest (so a resume is refused) and nothing else's; one of another size is
    refused before any work, not in the middle of the attack."""
    from tgr_bench.plan import make_plan

    common = ("experiment=smoke", "data=folder", f"data.root={csv_set}", "data.limit=2")
    admix = (*common, "attack.admix.enabled=true")

    def digest(*overrides: str) -> str:
        return make_plan(make_cfg(*overrides), tmp_path / "plan").data.digest

    with_pool, without = digest(*admix), digest(*common)
    assert with_pool != without
    write_images(tmp_path / "other", 1, seed=9)  # other content, same size, for the 5th image
    last = sorted(csv_set.glob("*.png"))[-1]
    last.write_bytes((tmp_path / "other" / "ILSVRC2012_val_00000001.png").read_bytes())
    assert digest(*admix) != with_pool and digest(*common) == without
    write_images(tmp_path / "small", 1, size=32)
    last.write_bytes((tmp_path / "small" / "ILSVRC2012_val_00000001.png").read_bytes())
    assert digest(*common) == without  # not an image of this run, nor a partner: no concern
    with pytest.raises(UserError, match=f"1 differ in size .* e.g. {last.name} \\(32, 32\\)"):
        digest(*admix)


def test_admix_needs_a_second_image(make_cfg, tmp_path: Path):
    from tgr_bench.plan import make_plan

    root = tmp_path / "one"
    (stem,) = write_images(root, 1)
    (root / "labels.csv").write_text(f"filename,label\n{stem}.png,3\n")
    cfg = make_cfg("experiment=smoke", "data=folder", f"data.root={root}")
    make_plan(cfg, tmp_path / "plan")  # fine without Admix
    with pytest.raises(UserError, match="holds a single image"):
        make_plan(
            make_cfg("experiment=smoke", "data=folder", f"data.root={root}",
                     "attack.admix.enabled=true"),
            tmp_path / "plan",
        )  # fmt: skip


def _rewrite_labels(root: Path, text: bytes) -> None:
    (root / "labels.csv").write_bytes(text)


def test_spreadsheet_labels_with_a_byte_order_mark_and_spaces_are_read(csv_set: Path):
    plain = load_folder(csv_set)
    rows = (csv_set / "labels.csv").read_text().splitlines()
    body = "\n".join(["filename, label", *rows[1:]]) + "\n"
    _rewrite_labels(csv_set, b"\xef\xbb\xbf" + body.encode())
    assert load_folder(csv_set).labels.tolist() == plain.labels.tolist()


@pytest.mark.parametrize(
    "text,match",
    [
        (b"\xf8\x00\xff garbage", "is not UTF-8 text"),
        (
            b"filename,label\nILSVRC2012_val_00000001.png,1\nILSVRC2012_val_00000001.png,2\n",
            "lists ILSVRC2012_val_00000001.png twice, with labels 1 and 2",
        ),
    ],
)
def test_labels_that_cannot_be_trusted_are_refused(csv_set: Path, text: bytes, match: str):
    _rewrite_labels(csv_set, text)
    with pytest.raises(UserError, match=match):
        load_folder(csv_set)


def test_an_empty_image_and_a_file_as_data_root_are_named(csv_set: Path):
    (csv_set / "ILSVRC2012_val_00000003.png").write_bytes(b"")
    with pytest.raises(UserError, match="00000003.png is empty \\(0 bytes\\)"):
        load_folder(csv_set)
    with pytest.raises(UserError, match="is a file, not a folder"):
        load_folder(csv_set / "labels.csv")
