"""A run directory and its record: the one place that names a run's files, says what identifies
a run, and reads and writes `run.json`.

Everything else (the CLI's run id, resume's "same settings?" check, the provenance of evaluated
folders, the report's table cells) asks this module rather than re-deriving it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tgr_bench.atomic import atomic_write
from tgr_bench.errors import UserError
from tgr_bench.hashing import digest

# The files of a run directory.
RUN_JSON = "run.json"
MANIFEST = "manifest.jsonl"
IMAGES_DIR = "images"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PREDICTIONS_CSV = "predictions.csv"
TARGETS_CSV = "targets.csv"  # a targeted run's aim (target_label) per image
DEFENDED = "+"  # a results target `T+<defense>`: target T evaluated under a defense
LABELS_CSV = "labels.csv"  # the labels a run attacked when the source gave them (smoke sets)
VARIANCE_JSON = "variance.json"  # the record of a tgr-bench-variance run
LOCK = ".tgr-bench.lock"

# Columns of results.csv: one row per (adversarial set, target).
RESULT_COLUMNS = [
    "run_id",
    "source",
    "attack",
    "params",
    "target",
    "target_model",
    "target_weights",
    "target_sha256",
    "white_box",
    "n",
    "asr",
    "clean_acc",
    "asr_on_correct",
    "n_fooled",
    "n_clean_correct",
    "n_fooled_on_correct",
    "tsr",
    "n_target_hit",
    "status",
]

STATUSES = ("running", "complete", "failed", "interrupted")
# Columns read back as text: a run id or a hash may look like a number ("012345...").
TEXT_COLUMNS = {"run_id": str, "target_sha256": str, "stem": str}


def format_params(params: dict[str, Any]) -> str:
    """The `params` text of results.csv: `alpha=1.6 decay=1.0 eps=16.0 steps=10`."""
    return " ".join(
        f"{k}={json.dumps(v) if isinstance(v, list | dict) else v}"
        for k, v in sorted(params.items())
    )


@dataclass(frozen=True)
class Identity:
    """What a run's adversarial images are a function of.

    Built from resolved values only (the attack's `params()`, the source model's own identity,
    the normalized data selection), never from the raw config, so a config key whose default
    changes nothing changes no identity. Evaluation-only runs have no source or attack and name
    the folders they evaluate instead.
    """

    source: dict[str, Any] | None
    attack: str | None
    params: dict[str, Any]
    data: dict[str, Any]
    seed: int
    precision: str
    shard: tuple[int, int] | None = None  # (index, count) of a sharded run
    adv_dir: tuple[str, ...] = ()

    def content(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "attack": self.attack,
            "params": self.params,
            "data": self.data,
            "seed": self.seed,
            "precision": self.precision,
            "shard": list(self.shard) if self.shard else None,
            "adv_dir": list(self.adv_dir),
        }

    def digest(self) -> str:
        return digest(self.content())

    @property
    def run_id(self) -> str:
        """The short id that names the default run directory."""
        return self.digest()[:12]

    def cell(self) -> str:
        """What one table cell is: the identity without the shard, so shards merge."""
        return digest({**self.content(), "shard": None})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Identity:
        shard = d.get("shard")
        return cls(
            source=d.get("source"),
            attack=d.get("attack"),
            params=dict(d.get("params") or {}),
            data=dict(d.get("data") or {}),
            seed=int(d.get("seed", 0)),
            precision=str(d.get("precision", "fp32")),
            shard=(int(shard[0]), int(shard[1])) if shard else None,
            adv_dir=tuple(d.get("adv_dir") or ()),
        )


@dataclass
class AdvSetInfo:
    """One adversarial image set a run evaluated, and the run that crafted it (None: a folder
    from elsewhere). `run_id` is what results.csv rows refer to."""

    run_id: str
    folder: str
    source: str
    attack: str
    params: dict[str, Any] = field(default_factory=dict)
    identity: Identity | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # the attack's default params


@dataclass
class DataInfo:
    root: str | None
    layout: str
    n_images: int
    sha256: str
    shard: str | None = None
    unlabeled_skipped: int = 0
    pool_sha256: str | None = None  # Admix runs: the partner pool (the whole data set)


@dataclass
class CraftStats:
    attacked: int = 0
    resumed: int = 0
    batch_size: int | None = None
    linf_levels_max: int | None = None
    png_compress_level: int | None = None
    hooks: dict[str, Any] = field(default_factory=dict)  # fired counts, sites, family


@dataclass
class RunRecord:
    """`run.json`: written once the settings are valid (status `running`), again at the end.

    Only `status == "complete"` means the results files are whole; anything else is a run that
    failed, was interrupted, or is still going.
    """

    identity: Identity
    config: dict[str, Any]
    started: str
    status: str = "running"
    finished: str | None = None
    error: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    device: dict[str, Any] = field(default_factory=dict)
    determinism: dict[str, Any] = field(default_factory=dict)
    data: DataInfo | None = None
    source: dict[str, Any] | None = None  # provenance of the loaded source model
    attack: dict[str, Any] | None = None  # label, reference, params, defaults
    crafting: CraftStats = field(default_factory=CraftStats)
    target_keys: list[str] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)  # provenance per target
    sets: list[AdvSetInfo] = field(default_factory=list)
    analysis: dict[str, Any] | None = None  # tgr-bench-variance: its attacks, cost and files

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["identity"] = self.identity.content()
        for s, info in zip(d["sets"], self.sets, strict=True):
            s["identity"] = info.identity.content() if info.identity else None
        return d

    def save(self, run_dir: Path, name: str = RUN_JSON) -> None:
        atomic_write(run_dir / name, json.dumps(self.to_dict(), indent=2, default=str).encode())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["identity"] = Identity.from_dict(d["identity"])
        if d.get("data"):
            values["data"] = DataInfo(**d["data"])
        values["crafting"] = CraftStats(**(d.get("crafting") or {}))
        values["sets"] = [
            AdvSetInfo(
                **{
                    **s,
                    "identity": Identity.from_dict(s["identity"]) if s.get("identity") else None,
                }
            )
            for s in d.get("sets") or []
        ]
        return cls(**values)

    @classmethod
    def load(cls, run_dir: Path, name: str = RUN_JSON) -> RunRecord | None:
        """The record of `run_dir`, or None when there is none (the run never got valid
        settings). A record that cannot be parsed is an error naming the file."""
        path = run_dir / name
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(
                f"{path} is not a tgr-bench run record ({type(e).__name__}: {e}). It was written "
                f"by another version or edited; re-run the command that made it, or move it."
            ) from e
