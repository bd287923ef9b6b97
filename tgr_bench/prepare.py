"""`tgr-bench-prepare`: build the reproducible 1000-image set from the raw ILSVRC2012 validation
images, and check an existing set.

Usage:
    tgr-bench-prepare build --val /data/imagenet/val --out data/val1000 [--per-class 1] [--seed 0]
    tgr-bench-prepare check data/val1000            # or the authors' clean_resized_images/
    tgr-bench-prepare convert-tf2torch /data/tf2torch /data/tf2torch_safe    # no pickles later
    tgr-bench-prepare fetch-paper-set data/tgr1000   # the paper's 1000 PNGs and labels (download)

`--val` is either the validation folder sorted into one sub-folder per synset (n01440764/...,
the usual layout after the devkit's valprep script; class index = the synset's place in the
canonical ImageNet-1k order shipped as tgr_bench/imagenet_synsets.txt, as timm/torchvision, also
when the folder holds only some synsets) or a flat folder of the 50,000 JPEGs with
`--labels FILE`, a CSV `filename,label` of 0-based class indices in that same order.
Selection: per class, the images sorted by name, `--per-class` of them drawn with a generator
seeded by `--seed` and the class.
Each is resized to short side 256 (bicubic), center-cropped to 224 and saved as PNG, with
`labels.csv` (docs/protocol.md).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import random
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from tgr_bench.atomic import atomic_write
from tgr_bench.data import IMAGE_EXTENSIONS, check_label, csv_rows, load_folder
from tgr_bench.entry import main_of
from tgr_bench.errors import UserError
from tgr_bench.pixels import batches

SHORT_SIDE, CROP = 256, 224
SYNSETS_FILE = Path(__file__).with_name("imagenet_synsets.txt")


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synset ids in class-index order (sorted wnids, as timm and
    torchvision number the classes)."""
    return SYNSETS_FILE.read_text().split()


def _synset_index(folders: list[Path]) -> dict[int, Path]:
    """Each synset folder under its canonical class index: a set with only some synsets keeps
    every synset's real ImageNet-1k index."""
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    unknown = [f.name for f in folders if f.name not in index]
    if unknown:
        raise UserError(
            f"{len(unknown)} sub-folder(s) of {folders[0].parent} are not ImageNet-1k synset ids "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): name each class "
            f"folder by its synset (n01440764, ...), or pass a flat folder with --labels."
        )
    return {index[f.name]: f for f in folders}


def _raw_index(val: Path, labels: Path | None) -> dict[int, list[Path]]:
    if not val.is_dir():
        raise UserError(f"Validation folder {val} does not exist.")
    by_class: dict[int, list[Path]] = {}
    synsets = sorted(p for p in val.iterdir() if p.is_dir())
    if synsets:
        for label, folder in _synset_index(synsets).items():
            by_class[label] = sorted(
                p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
            )
        return by_class
    if labels is None:
        raise UserError(f"{val} has no synset sub-folders: pass --labels filename,label CSV.")
    if not labels.is_file():
        raise UserError(f"--labels {labels} does not exist.")
    header, rows = csv_rows(labels)
    if not {"filename", "label"} <= set(header):
        raise UserError(f"{labels} needs a header with columns filename,label (got {header}).")
    for row in rows:
        name = (row.get("filename") or "").strip()
        label = check_label(row.get("label"), f"{name} in {labels}")
        by_class.setdefault(label, []).append(val / name)
    return {k: sorted(v) for k, v in by_class.items()}


def resize_crop(path: Path) -> Image.Image:
    """Short side 256 (bicubic), then the center 224x224, as torchvision's Resize+CenterCrop."""
    try:
        with Image.open(path) as im:
            return _resize_crop(im.convert("RGB"))
    except OSError as e:  # missing, truncated or not an image
        raise UserError(f"Cannot read image {path}: {e}. Replace or remove the file.") from e


def _resize_crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    if w <= h:
        size = (SHORT_SIDE, int(SHORT_SIDE * h / w))
    else:
        size = (int(SHORT_SIDE * w / h), SHORT_SIDE)
    im = im.resize(size, Image.BICUBIC)
    left = int(round((size[0] - CROP) / 2.0))
    top = int(round((size[1] - CROP) / 2.0))
    return im.crop((left, top, left + CROP, top + CROP))


def _empty_destination(out: Path) -> None:
    """A set is written only into a new or empty folder: never over or beside another set."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a new or empty folder for the image set.")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        raise UserError(
            f"--out {out} already holds {len(held)} file(s) ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}); pass a new or empty folder (a set is never "
            f"written over or beside another)."
        )


def _unique_names(chosen: list[tuple[Path, int]]) -> None:
    """Output files are named by the input's stem: two inputs with one stem would overwrite."""
    seen: dict[str, Path] = {}
    for path, _ in chosen:
        other = seen.setdefault(path.stem, path)
        if other != path:
            raise UserError(
                f"{other} and {path} would both be saved as {path.stem}.png; rename one of "
                f"them so that every image of --val has its own file name."
            )


def build(val: Path, out: Path, labels: Path | None, per_class: int, seed: int) -> int:
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"--per-class {per_class}: need a whole number of images >= 1.")
    _empty_destination(out)
    by_class = _raw_index(val, labels)
    rows = []
    chosen = []
    for label in sorted(by_class):
        files = by_class[label]
        if len(files) < per_class:
            raise UserError(f"Class {label} has {len(files)} images, fewer than {per_class}.")
        picked = sorted(random.Random(f"{seed}:{label}").sample(files, per_class))
        chosen += [(path, label) for path in picked]
    _unique_names(chosen)
    written: list[Path] = []
    try:  # a failure leaves no part of the set behind (it would look like a smaller set)
        for path, label in chosen:
            buf = io.BytesIO()
            resize_crop(path).save(buf, format="PNG")
            atomic_write(out / f"{path.stem}.png", buf.getvalue())
            written.append(out / f"{path.stem}.png")
            rows.append((f"{path.stem}.png", label))
    except BaseException:
        for w in written:
            w.unlink(missing_ok=True)
        raise
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["filename", "label"])
    writer.writerows(sorted(rows))
    atomic_write(out / "labels.csv", text.getvalue().encode())
    return len(rows)


def check(root: Path) -> list[str]:
    """Problems with an image set (empty when it is sound): readable 8-bit RGB 224x224 images,
    labels for all of them in 0..999, one image per class, no duplicate pixels."""
    data = load_folder(root)  # raises on unreadable files, bad labels, mixed sizes
    problems = []
    if data.size != (CROP, CROP):
        problems.append(f"images are {data.size}, not 224x224")
    per_class = Counter(data.labels.tolist())
    if len(per_class) != len(data):
        extra = sum(c - 1 for c in per_class.values())
        problems.append(f"{extra} images share a class with another image")
    digests: dict[str, str] = {}
    for idx, decoded in batches(data.pixels, range(len(data)), 64):  # pixels, not file bytes
        for i, img in zip(idx, decoded, strict=True):
            d = hashlib.sha256(img.numpy().tobytes()).hexdigest()
            if d in digests:
                problems.append(f"{data.stems[i]} duplicates {digests[d]}")
            digests.setdefault(d, data.stems[i])
    print(f"{root}: {len(data)} images, {len(per_class)} classes, layout {data.layout}")
    return problems


def convert_tf2torch(src: Path, dst: Path) -> list[Path]:
    """Every converted TF-slim `.npy` of `src` (released `tf2torch_*` or public `tf_*` names)
    rewritten once as `<released stem>.safetensors` in `dst`: later runs (`tf2torch_dir=dst`)
    then read no pickle at all. The `.npy` files are unpickled with an allow-list (numpy arrays
    and plain containers only); anything else is refused and never runs."""
    from tgr_bench.tfslim import FILES, convert

    if not src.is_dir():
        raise UserError(f"{src} is not a folder of converted TF-slim weights (tf2torch_*.npy).")
    written = []
    for names in FILES.values():
        for name in (names.released_name, names.public_name):
            if (src / name).is_file():
                out = dst / Path(names.released_name).with_suffix(".safetensors").name
                dst.mkdir(parents=True, exist_ok=True)
                meta = convert(src / name, out)
                print(f"{src / name} -> {out} ({meta.get('key') or 'unknown model'})")
                written.append(out)
                break
    if not written:
        expected = ", ".join(n.released_name for n in FILES.values())
        raise UserError(
            f"No converted TF-slim weights in {src}; expected files such as {expected}."
        )
    return written


# The paper's 1000 images and labels, as the TGR authors published them in their repository
# (github.com/jpzhang1810/TGR: clean_resized_images/ and image_name_to_class_id_and_name.json).
PAPER_SET_URL = "https://github.com/jpzhang1810/TGR/archive/refs/heads/master.zip"
PAPER_SET_IMAGES = 1000


def _check_set(images_dir: Path, label_file: Path, expect: int) -> list[Path]:
    """The count, every PNG a readable 224x224 RGB image, a label for each."""
    import json

    from tgr_bench.pixels import inspect_file

    pngs = sorted(images_dir.glob("*.png"))
    if len(pngs) != expect:
        raise UserError(f"{images_dir} holds {len(pngs)} PNGs, expected {expect}.")
    stems = {Path(name).stem for name in json.loads(label_file.read_text())}
    for png in pngs:
        info = inspect_file(png)
        if info.size != (CROP, CROP):
            raise UserError(f"{png.name} is {info.size[1]}x{info.size[0]}, not 224x224.")
        if png.stem not in stems:
            raise UserError(f"{png.name} has no label in {label_file}.")
    return pngs


def fetch_paper_set(
    dest: Path, url: str = PAPER_SET_URL, expect: int = PAPER_SET_IMAGES, timeout: float = 60.0
) -> Path:
    """Download the authors' repository archive, keep its images and label file, check them
    (the count, every PNG a readable 224x224 RGB image, a label for each) and return the image
    folder for `data.root=`. Nothing is left in `dest` unless every check passed."""
    import shutil

    from tgr_bench.data import JSON_LABELS

    if expect < 1:
        raise UserError(f"--expect {expect}: need the number of images the set holds (>= 1).")
    images_dir = dest / "clean_resized_images"
    if images_dir.is_dir() and (dest / JSON_LABELS).is_file():
        print(f"{images_dir} exists; checking it")
    else:
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        try:
            _fetch_into(dest, url, expect, timeout)
        except BaseException:
            if created:  # a failed fetch leaves no empty folder behind
                shutil.rmtree(dest, ignore_errors=True)
            raise
    pngs = _check_set(images_dir, dest / JSON_LABELS, expect)
    print(f"{len(pngs)} images, 224x224 RGB, each with its label. Use: data.root={images_dir}")
    return images_dir


def _fetch_into(dest: Path, url: str, expect: int, timeout: float) -> None:
    import shutil
    import tempfile
    import urllib.request
    import zipfile

    from tgr_bench.data import JSON_LABELS

    images_dir = dest / "clean_resized_images"
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        archive = Path(tmp) / "set.zip"
        try:
            with (
                urllib.request.urlopen(url, timeout=timeout) as response,
                open(archive, "wb") as out,
            ):
                shutil.copyfileobj(response, out, length=1 << 20)
        except OSError as e:
            raise UserError(
                f"Cannot download {url}: {e}. On a machine with network, download that "
                f"archive (the TGR authors' repository, github.com/jpzhang1810/TGR) and pass "
                f"it with --url file://<path to the .zip>, or copy its clean_resized_images/ "
                f"and {JSON_LABELS} into {dest}."
            ) from e
        staged = Path(tmp) / "set"
        (staged / "clean_resized_images").mkdir(parents=True)
        try:
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():
                    parts = Path(member).parts
                    if (
                        len(parts) >= 2
                        and parts[-2] == "clean_resized_images"
                        and (member.endswith(".png"))
                    ):
                        target = staged / "clean_resized_images" / parts[-1]
                    elif parts and parts[-1] == JSON_LABELS:
                        target = staged / JSON_LABELS
                    else:
                        continue
                    with z.open(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        except zipfile.BadZipFile as e:
            raise UserError(f"{url} is not a zip archive ({e}).") from e
        if not (staged / JSON_LABELS).is_file():
            raise UserError(f"The archive {url} holds no {JSON_LABELS}: not the TGR set.")
        try:
            _check_set(staged / "clean_resized_images", staged / JSON_LABELS, expect)
        except UserError as e:  # name the archive, not the temporary folder it came to
            raise UserError(
                f"The archive {url} is not the expected set: {str(e).replace(str(staged), '')}"
                f" Fetch it again, or check --url."
            ) from None
        shutil.rmtree(images_dir, ignore_errors=True)
        (staged / "clean_resized_images").rename(images_dir)
        (staged / JSON_LABELS).replace(dest / JSON_LABELS)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="tgr-bench-prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the seeded one-image-per-class set")
    b.add_argument(
        "--val",
        type=Path,
        required=True,
        help="ILSVRC2012 validation images: one sub-folder per synset, or flat with --labels",
    )
    b.add_argument(
        "--labels",
        type=Path,
        help="CSV filename,label (0-based ImageNet-1k index) for a flat --val",
    )
    b.add_argument("--out", type=Path, required=True, help="a new or empty folder for the set")
    b.add_argument("--per-class", type=int, default=1, help="images drawn per class (default 1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the per-class draw (default 0)")
    c = sub.add_parser("check", help="check an existing set")
    c.add_argument("root", type=Path, help="the set's folder (PNGs with labels.csv/labels.json)")
    t = sub.add_parser(
        "convert-tf2torch", help="rewrite converted TF-slim .npy weights as safetensors, once"
    )
    t.add_argument("src", type=Path, help="folder of tf2torch_*.npy / tf_*.npy files")
    t.add_argument("dst", type=Path, help="folder for the .safetensors files (may be src)")
    f = sub.add_parser("fetch-paper-set", help="download the paper's 1000 images and labels")
    f.add_argument("dest", type=Path, help="folder that receives clean_resized_images/")
    f.add_argument("--url", default=PAPER_SET_URL, help="the archive (default: the authors' repo)")
    f.add_argument("--expect", type=int, default=PAPER_SET_IMAGES, help="images it must hold")
    args = p.parse_args(argv)
    main_of("tgr-bench-prepare", lambda: _command(args))


def _command(args: argparse.Namespace) -> None:
    if args.command == "fetch-paper-set":
        fetch_paper_set(args.dest, args.url, args.expect)
        return
    if args.command == "convert-tf2torch":
        convert_tf2torch(args.src, args.dst)
        return
    if args.command == "build":
        n = build(args.val, args.out, args.labels, args.per_class, args.seed)
        print(f"wrote {n} images and labels.csv to {args.out}")
        problems = check(args.out)
    else:
        problems = check(args.root)
    for problem in problems:
        print(f"problem: {problem}")
    print("ok" if not problems else f"{len(problems)} problem(s)")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
