"""Clean image sets: the TGR json layout, a folder with labels.csv, or synthetic images.

A set is a small record per image (name, label, file and its sha256) plus a `Pixels` source
that decodes batches on demand (pixels.py). Every file is opened and checked when the set is
loaded (header, mode, size, integrity), so a bad file stops the run before any attack work,
with the file named, while no image is decoded until a batch needs it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tgr_bench import schema
from tgr_bench.atomic import atomic_write
from tgr_bench.errors import UserError
from tgr_bench.pixels import FilePixels, Pixels, SyntheticPixels, inspect_files, read_image
from tgr_bench.record import LABELS_CSV

__all__ = [
    "DataSpec",
    "FolderData",
    "ImageSet",
    "SyntheticData",
    "data_spec",
    "load_dataset",
    "load_folder",
    "read_image",
    "synthetic",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
JSON_LABELS = "image_name_to_class_id_and_name.json"
CSV_LABELS = "labels.csv"
NUM_CLASSES = 1000


@dataclass(frozen=True)
class Selection:
    """Which of a data set's images a run attacks: the keys every data layout has."""

    kind: str = schema.key("folder")
    limit: int | None = schema.key(None, low=1, help="only the first N images (sorted by name)")
    num_shards: int = schema.key(1, low=1, help="split the set into N shards (every N-th image)")
    shard: int = schema.key(0, low=0, help="... and attack shard i (0..N-1)")
    only_present: bool = schema.key(
        False, help="adv_dir evaluations: only the clean images every folder has (counted)"
    )

    def check(self, where: str) -> None:
        if self.shard >= self.num_shards:
            raise UserError(
                f"{where}.shard={self.shard!r}: need an int in 0..{self.num_shards - 1}."
            )

    @property
    def shard_of(self) -> tuple[int, int] | None:
        return (self.shard, self.num_shards) if self.num_shards > 1 else None


@dataclass(frozen=True)
class FolderData(Selection):
    """data=folder: clean images in a folder; the layout is detected (labels.csv in it, or the
    TGR set: clean_resized_images/ + image_name_to_class_id_and_name.json beside or above)."""

    kind: str = schema.key("folder", options=("folder",))
    root: str | None = schema.key(None, help="required: data.root=/path/to/clean_images")
    allow_unlabeled: bool = schema.key(
        False,
        identity=False,  # a permission: a set with unlabelled files runs, on the same images
        help="true: skip images without a label (counted in the summary and run.json)",
    )

    def check(self, where: str) -> None:
        super().check(where)
        if not self.root:
            raise UserError(
                "data.root is not set. Pass data.root=<folder of clean images> (with labels.csv "
                "or image_name_to_class_id_and_name.json), or try the offline smoke run: "
                "tgr-bench experiment=smoke."
            )

    def identity(self) -> dict[str, Any]:
        """The selection, without the shard (a run's identity carries the shard separately, so
        that shards of one selection merge)."""
        root = str(Path(str(self.root)).expanduser().resolve())
        selection = {"kind": "folder", "root": root, "limit": self.limit}
        return selection | ({"only_present": True} if self.only_present else {})


@dataclass(frozen=True)
class SyntheticData(Selection):
    """data=synthetic: smooth random images generated in memory (offline smoke runs, tests)."""

    kind: str = schema.key("synthetic", options=("synthetic",))
    n: int = schema.key(8, low=1)
    size: int = schema.key(224, low=1)
    seed: int = schema.key(0, low=0)
    labels: str = schema.key(
        "random",
        options=("random", "source"),
        help="random | source (the source model's clean prediction: smoke runs)",
    )

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "synthetic",
            "n": self.n,
            "size": self.size,
            "seed": self.seed,
            "labels": self.labels,
            "limit": self.limit,
        }


DataSpec = FolderData | SyntheticData
DATA_KINDS: dict[str, type[Selection]] = {"folder": FolderData, "synthetic": SyntheticData}


def data_spec(raw: Any, where: str = "data") -> DataSpec:
    """The checked `data` group: its `kind` picks the declaration."""
    values = dict(schema.plain(raw) or {})
    kind = values.get("kind", "folder")
    if kind not in DATA_KINDS:
        raise UserError(f"Unknown data.kind {kind!r}; use one of {list(DATA_KINDS)}.")
    return schema.parse(DATA_KINDS[kind], values, where)  # type: ignore[return-value]


@dataclass
class ImageSet:
    stems: list[str]
    labels: torch.Tensor  # (N,) int64, 0-based ImageNet-1k classes
    pixels: Pixels  # decodes the stored pixels of any images, by index, on demand
    root: str | None
    layout: str
    size: tuple[int, int]  # (height, width) of every image
    shard: str | None = None  # "i/N" when this is one shard of a larger set
    unlabeled_skipped: int = 0
    file_sha256: list[str] | None = None  # folder sets: each file's hash, from the check
    # The target labels of a targeted run (set by the pipeline, then part of the digest), and
    # labels.csv's raw `target` cells, read and checked only when a targeted run asks for them.
    aims: torch.Tensor | None = None
    aim_column: list[str] | None = None
    # The whole data set in listing order, before data.limit and sharding, and each image's
    # place in it: Admix mixes in other clean images from there, so shards equal the whole run.
    pool: Pixels | None = None
    pool_index: list[int] | None = None
    pool_sha256: str | None = None  # set by checked_pool(): Admix runs depend on the whole pool
    _digest: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def digest(self) -> str:
        """sha256 of what the images of a run are crafted from: names, labels and each file's
        bytes (synthetic sets: the parameters that generate their pixels)."""
        if self._digest is None:
            h = hashlib.sha256("\n".join(self.stems).encode())
            h.update(self.labels.numpy().tobytes())
            if self.aims is not None:
                # b"targets" tags the aims in every data digest that manifests compare.
                h.update(b"targets" + self.aims.numpy().tobytes())
            if self.pool_sha256 is not None:
                h.update(b"pool" + self.pool_sha256.encode())
            if self.file_sha256 is not None:
                h.update("\n".join(self.file_sha256).encode())
            else:
                assert isinstance(self.pixels, SyntheticPixels)
                h.update(self.pixels.low.numpy().tobytes())
                h.update(str(self.pixels.size).encode())
            self._digest = h.hexdigest()
        return self._digest

    def with_labels(self, labels: torch.Tensor) -> ImageSet:
        return replace(self, labels=labels, _digest=None)

    def with_aims(self, aims: torch.Tensor) -> ImageSet:
        return replace(self, aims=aims, _digest=None)

    def column_aims(self) -> torch.Tensor | None:
        """labels.csv's `target` column for these images, checked (None without the column)."""
        if self.aim_column is None:
            return None
        where = f"{CSV_LABELS} of {self.root}"
        return torch.tensor(
            [
                check_label(v, f"the target of {stem} in {where}")
                for stem, v in zip(self.stems, self.aim_column, strict=True)
            ],
            dtype=torch.int64,
        )

    def checked_pool(self) -> ImageSet:
        """This set with its Admix partner pool (the whole listing, beyond data.limit and the
        shard) checked like the images themselves and hashed into the digest: the adversarial
        images depend on every pool image, so a changed pool must not pass for the same data."""
        pool = self.pool or self.pixels
        if len(pool) < 2:
            raise UserError(
                "attack.admix mixes each image with other clean images of the data set, and this "
                "one holds a single image. Use a larger data set or turn attack.admix off."
            )
        if isinstance(pool, FilePixels):
            pairs = list(zip(pool.paths, inspect_files(pool.paths), strict=True))
            odd = [(p, i.size) for p, i in pairs if i.size != self.size]
            if odd:
                raise UserError(
                    f"attack.admix draws partners from every image of {self.root}, and "
                    f"{len(odd)} differ in size from the attacked ones ({self.size}), e.g. "
                    f"{odd[0][0].name} {odd[0][1]}. Resize the whole set first."
                )
            content = "\n".join(f"{p.name} {i.sha256}" for p, i in pairs)
        elif isinstance(pool, SyntheticPixels):
            content = f"{pool.size} " + hashlib.sha256(pool.low.numpy().tobytes()).hexdigest()
        else:  # in-memory pixels (benchmarks)
            content = hashlib.sha256(pool.load(range(len(pool))).numpy().tobytes()).hexdigest()
        digest = hashlib.sha256(f"{len(pool)}\n{content}".encode()).hexdigest()
        return replace(self, pool=pool, pool_sha256=digest, _digest=None)

    def subset(self, idx: list[int], shard: str | None) -> ImageSet:
        return replace(
            self,
            stems=[self.stems[i] for i in idx],
            labels=self.labels[idx],
            pixels=self.pixels.subset(idx),
            shard=shard,
            file_sha256=[self.file_sha256[i] for i in idx] if self.file_sha256 else None,
            aims=self.aims[idx] if self.aims is not None else None,
            aim_column=[self.aim_column[i] for i in idx] if self.aim_column else None,
            pool_index=[self.pool_index[i] for i in idx] if self.pool_index else None,
            _digest=None,
        )

    def load(self, idx: list[int] | None = None) -> torch.Tensor:
        """Decoded pixels of these images (all when idx is None): for small sets and tests."""
        return self.pixels.load(range(len(self)) if idx is None else idx)


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in found:
                raise UserError(
                    f"Two images share the name {p.stem!r} in {folder}: {found[p.stem].name} and "
                    f"{p.name}. Keep one: results are keyed by file stem."
                )
            found[p.stem] = p
    return found


def check_label(value: Any, where: str) -> int:
    try:
        label = int(str(value).strip())
    except ValueError:
        raise UserError(f"Label {value!r} for {where} is not an integer class id.") from None
    if not 0 <= label < NUM_CLASSES:
        raise UserError(f"Label {label} for {where} is outside 0..{NUM_CLASSES - 1}.")
    return label


def detect_layout(root: Path) -> tuple[str, Path, Path]:
    """(layout, image folder, label file) for a data root."""
    if root.exists() and not root.is_dir():
        raise UserError(
            f"data.root={root} is a file, not a folder: pass the folder that holds the clean "
            f"images and {CSV_LABELS} (or {JSON_LABELS})."
        )
    if not root.is_dir():
        raise UserError(
            f"Data folder {root} does not exist. Pass a folder holding the clean images with "
            f"{CSV_LABELS}, or the TGR set's clean_resized_images/ with {JSON_LABELS} beside or "
            f"one level above it (tgr-bench: data.root=<folder>; offline, the smoke test needs "
            f"none: experiment=smoke)."
        )
    if (root / CSV_LABELS).is_file():
        return "csv", root, root / CSV_LABELS
    for images, labels in (
        (root / "clean_resized_images", root / JSON_LABELS),  # the authors' repository root
        (root, root / JSON_LABELS),
        (root, root.parent / JSON_LABELS),
    ):
        if labels.is_file() and images.is_dir():
            return "json", images, labels
    raise UserError(
        f"No labels found for {root}: expected {CSV_LABELS} in it (filename,label), or "
        f"{JSON_LABELS} in it or its parent (the TGR/PNA authors' layout)."
    )


def csv_rows(label_file: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of labels.csv. Spreadsheets' byte-order mark and spaces around header
    names are accepted; a file that is not text is an error naming it."""
    try:
        with open(label_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = [dict(zip(header, row, strict=False)) for row in reader if row]
    except UnicodeDecodeError as e:
        raise UserError(
            f"{label_file} is not UTF-8 text ({e.reason} at byte {e.start}). Save it as a "
            f"UTF-8 CSV with the header filename,label."
        ) from None
    return header, rows


def _read_aim_column(label_file: Path) -> dict[str, str]:
    """The optional `target` column of labels.csv, raw (stem -> cell): checked only by a
    targeted run that uses it, so an untargeted run never depends on it."""
    header, rows = csv_rows(label_file)
    if "target" not in header:
        return {}
    return {Path((r.get("filename") or "").strip()).stem: r.get("target") or "" for r in rows}


def _read_labels(layout: str, label_file: Path) -> dict[str, int]:
    labels: dict[str, int] = {}
    if layout == "csv":
        header, rows = csv_rows(label_file)
        if not {"filename", "label"} <= set(header):
            raise UserError(
                f"{label_file} needs a header with columns filename,label (got {header})."
            )
        for row in rows:
            name = (row.get("filename") or "").strip()
            label = check_label(row.get("label"), f"{name} in {label_file}")
            stem = Path(name).stem
            if labels.get(stem, label) != label:
                raise UserError(
                    f"{label_file} lists {name} twice, with labels {labels[stem]} and {label}. "
                    f"Keep the right row."
                )
            labels[stem] = label
    else:
        try:
            table = json.loads(label_file.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"Cannot parse {label_file}: {e}") from e
        for name, entry in table.items():
            value = entry.get("class_id") if isinstance(entry, dict) else entry
            labels[Path(name).stem] = check_label(value, f"{name} in {label_file}")
    return labels


def shard_indices(n: int, num_shards: int, shard: int) -> list[int]:
    """Shard `shard` of `num_shards`: every num_shards-th image of the sorted set."""
    return list(range(shard, n, num_shards))


def _labelled(
    layout: str, folder: Path, label_file: Path, allow_unlabeled: bool
) -> tuple[list[str], dict[str, int], dict[str, Path], int]:
    """(every labelled image's stem in order, labels, image paths, images skipped unlabelled)."""
    labels = _read_labels(layout, label_file)
    images = _images_by_stem(folder)
    if not images:
        raise UserError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}.")
    unlabeled = sorted(set(images) - set(labels))
    if unlabeled and not allow_unlabeled:
        raise UserError(
            f"{len(unlabeled)} images in {folder} have no label in {label_file}, e.g. "
            f"{unlabeled[:5]}. Add them to the label file, remove them from the folder, or pass "
            f"data.allow_unlabeled=true to skip them (the count is reported)."
        )
    if unlabeled:
        log.warning("%d images without a label in %s are skipped", len(unlabeled), label_file)
    missing = sorted(set(labels) - set(images))
    if missing and layout == "csv":
        raise UserError(
            f"{len(missing)} files listed in {label_file} are missing from {folder}, e.g. "
            f"{missing[:3]}."
        )
    if missing:  # the authors' json lists the whole set; a subset folder is legitimate
        log.warning(
            "%d label entries have no image in %s (e.g. %s); they are ignored",
            len(missing),
            folder,
            missing[:3],
        )
    return sorted(set(images) & set(labels)), labels, images, len(unlabeled)


def _one_size(folder: Path, stems: list[str], infos: list[Any]) -> tuple[int, int]:
    sizes = {info.size for info in infos}
    if len(sizes) > 1:
        odd = next(s for s, i in zip(stems, infos, strict=True) if i.size != infos[0].size)
        raise UserError(
            f"Images in {folder} differ in size ({sorted(sizes)}; e.g. {odd!r} vs {stems[0]!r}). "
            f"The protocol stores every image at one size (224x224); resize the set first."
        )
    return infos[0].size


def load_folder(
    root: str | Path,
    limit: int | None = None,
    num_shards: int = 1,
    shard: int = 0,
    allow_unlabeled: bool = False,
) -> ImageSet:
    root = Path(root).expanduser()
    layout, folder, label_file = detect_layout(root)
    # The whole set in order, before limit and sharding: Admix draws its partners from it.
    listing, labels, images, skipped = _labelled(layout, folder, label_file, allow_unlabeled)
    chosen = listing[:limit] if limit is not None else listing
    stems = [chosen[i] for i in shard_indices(len(chosen), num_shards, shard)]
    if not stems:
        raise UserError(
            f"Shard {shard}/{num_shards} of {folder} holds no images: use at most "
            f"{len(chosen)} shards."
        )
    paths = [images[s] for s in stems]
    infos = inspect_files(paths)
    column = _read_aim_column(label_file) if layout == "csv" else {}
    position = {s: i for i, s in enumerate(listing)}
    return ImageSet(
        stems=stems,
        labels=torch.tensor([labels[s] for s in stems], dtype=torch.int64),
        pixels=FilePixels(paths),
        root=str(root.resolve()),
        layout=layout,
        size=_one_size(folder, stems, infos),
        shard=f"{shard}/{num_shards}" if num_shards > 1 else None,
        unlabeled_skipped=skipped,
        file_sha256=[i.sha256 for i in infos],
        aim_column=[column[s] for s in stems] if column else None,
        pool=FilePixels([images[s] for s in listing]),
        pool_index=[position[s] for s in stems],
    )


def synthetic(n: int, size: int = 224, seed: int = 0) -> ImageSet:
    """Smooth random images with random labels: enough to exercise the pipeline offline."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    pixels = SyntheticPixels(low, size)
    return ImageSet(
        stems=[f"synthetic_{i:04d}" for i in range(n)],
        labels=labels,
        pixels=pixels,
        root=None,
        layout="synthetic",
        size=(size, size),
        pool=pixels,
        pool_index=list(range(n)),
    )


def load_dataset(spec: DataSpec) -> ImageSet:
    if isinstance(spec, SyntheticData):
        n = min(spec.n, spec.limit) if spec.limit is not None else spec.n
        full = synthetic(n, spec.size, spec.seed)
        if n < spec.n:  # Admix's partners: all spec.n images (the first n pixels are the same)
            full = replace(full, pool=synthetic(spec.n, spec.size, spec.seed).pixels)
        if spec.num_shards == 1:
            return full
        idx = shard_indices(len(full), spec.num_shards, spec.shard)
        if not idx:
            raise UserError(
                f"Shard {spec.shard}/{spec.num_shards} of the {len(full)} synthetic images holds "
                f"no images: use at most {len(full)} shards."
            )
        return full.subset(idx, f"{spec.shard}/{spec.num_shards}")
    return load_folder(spec.root, spec.limit, spec.num_shards, spec.shard, spec.allow_unlabeled)


def adversarial_folder(folder: str | Path) -> Path:
    """A folder of adversarial images given with adv_dir=, which must exist."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"Adversarial folder {path} does not exist (adv_dir=...).")
    return path


def present_stems(folder: str | Path) -> set[str]:
    """The image names a folder holds (for data.only_present)."""
    return set(_images_by_stem(adversarial_folder(folder)))


def adversarial_pixels(folder: str | Path, clean: ImageSet) -> FilePixels:
    """The adversarial images `<folder>/<clean stem>.png` of every clean image, checked like
    clean ones (present, readable, the clean image's size) and decoded on demand."""
    folder = adversarial_folder(folder)
    found = _images_by_stem(folder)
    missing = [s for s in clean.stems if s not in found]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(clean)} clean images have no adversarial image in {folder}, "
            f"e.g. {missing[:3]} (expected <clean stem>.png). To evaluate just the images the "
            f"folder has, pass data.only_present=true."
        )
    paths = [found[s] for s in clean.stems]
    for path, info in zip(paths, inspect_files(paths), strict=True):
        if info.size != clean.size:
            raise UserError(
                f"Adversarial image {path} is {info.size[1]}x{info.size[0]}, its clean image is "
                f"{clean.size[1]}x{clean.size[0]}: the sets do not match."
            )
    return FilePixels(paths)


def source_labelled(selection: Any) -> bool:
    """A synthetic set labelled with the source's clean predictions (data.labels=source)."""
    return isinstance(selection, SyntheticData) and selection.labels == "source"


def source_labelled_identity(identity: dict[str, Any]) -> bool:
    """The same test on a run record's data identity."""
    return identity.get("kind") == "synthetic" and identity.get("labels") == "source"


def write_run_labels(run_dir: Path, data: ImageSet) -> None:
    """The labels a run attacked, beside its images, when no file holds them (source-labelled
    sets): an evaluation of the images takes them from here."""
    rows = "".join(f"{s},{int(y)}\n" for s, y in zip(data.stems, data.labels.tolist(), strict=True))
    atomic_write(run_dir / LABELS_CSV, ("stem,label\n" + rows).encode())


def read_run_labels(run_dir: Path, stems: list[str]) -> torch.Tensor:
    """The labels a source-labelled run attacked, in the order of `stems`."""
    path = run_dir / LABELS_CSV
    if not path.is_file():
        raise UserError(
            f"{run_dir} was crafted with data.labels=source (each image labelled by its source's "
            f"clean prediction) but holds no {LABELS_CSV} with those labels (was it removed?); "
            f"craft the images again into a new run folder."
        )
    _, rows = csv_rows(path)
    table = {row["stem"]: check_label(row.get("label"), f"{row['stem']} in {path}") for row in rows}
    missing = [s for s in stems if s not in table]
    if missing:
        raise UserError(f"{path} has no label for {len(missing)} images, e.g. {missing[:3]}.")
    return torch.tensor([table[s] for s in stems], dtype=torch.int64)
