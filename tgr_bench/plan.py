"""From a composed config to the validated plan of one run, in two steps:

- `resolve(cfg)`: the config into typed, validated specs (root settings, data selection, source
  and target model entries, the attack built with the source's family) and the run's identity.
  Pure: no file is read. The default run directory (the CLI's resolver) and `make_plan` share
  one resolution per config, so a run's config is resolved exactly once.
- `make_plan(cfg, out_dir)`: the specs plus what they point to: the runtime on this machine,
  the clean images (checked), the weight files, the folders to evaluate.

Every input error surfaces here, before the run directory is touched. Nothing below the plan
reads the raw config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import OmegaConf

from tgr_bench.advsets import describe_folder
from tgr_bench.attacks import MIFGSM, build_attack
from tgr_bench.attacks.architectures import source_family
from tgr_bench.data import (
    DataSpec,
    ImageSet,
    data_spec,
    load_dataset,
    present_stems,
    read_run_labels,
    source_labelled,
    source_labelled_identity,
)
from tgr_bench.errors import UserError
from tgr_bench.hashing import digest
from tgr_bench.models import (
    MissingCheckpoint,
    ModelSpec,
    WeightFile,
    check_model_name,
    resolve_weights,
)
from tgr_bench.record import AdvSetInfo, Identity
from tgr_bench.schema import parse, plain
from tgr_bench.settings import RunSettings, Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

# The nodes of a composed config that are groups, not root keys.
GROUP_NODES = ("attack", "source", "targets", "data", "attack_overrides", "hydra")


def root_settings(cls: type, config: dict[str, Any]) -> Any:
    """The root keys of a composed config (plain values), checked against `cls`."""
    return parse(cls, {k: v for k, v in config.items() if k not in GROUP_NODES}, "")


@dataclass(frozen=True)
class RunSpec:
    """A run's config, resolved: what its images and tables are a function of."""

    config: dict[str, Any]  # the composed config, plain (run.json)
    settings: RunSettings
    data: DataSpec
    source: ModelSpec | None  # None: an evaluation of existing folders (adv_dir)
    attack: MIFGSM | None
    targets: tuple[ModelSpec, ...]
    identity: Identity

    @property
    def adv_dir(self) -> tuple[str, ...]:
        return self.settings.adv_dir or ()


def _identity(settings: RunSettings, data: DataSpec, source: Any, attack: Any) -> Identity:
    common = {
        "data": data.identity(),
        "seed": settings.seed,
        "precision": settings.precision,
        "shard": data.shard_of,
    }
    if settings.adv_dir:
        folders = tuple(str(Path(f).expanduser().resolve()) for f in settings.adv_dir)
        return Identity(source=None, attack=None, params={}, adv_dir=folders, **common)
    return Identity(source=source.identity(), attack=attack.label, params=attack.params(), **common)


def _targets(config: dict[str, Any]) -> tuple[ModelSpec, ...]:
    # The dict key is what users override (targets.<key>.checkpoint=...): it names the model.
    entries = config.get("targets") or {}
    return tuple(ModelSpec.of(e, key=k, where=f"targets.{k}") for k, e in entries.items())


def _resolve(config: dict[str, Any]) -> RunSpec:
    settings: RunSettings = root_settings(RunSettings, config)
    data = data_spec(config.get("data"))
    if getattr(data, "only_present", False) and not settings.adv_dir:
        raise UserError("data.only_present=true applies to adv_dir= evaluations only.")
    source = attack = None
    if not settings.adv_dir:
        source = ModelSpec.of(config["source"])
        attack = build_attack(
            config["attack"], source_family(source.arch), source.key, arch=source.arch
        )
    targets = _targets(config)
    identity = _identity(settings, data, source, attack)
    return RunSpec(config, settings, data, source, attack, targets, identity)


# Specs resolved for the run-directory resolver, taken by the plan of the same config.
_RESOLVED: dict[tuple[str, str], Any] = {}


def once(cfg: Any, build: Callable[[dict[str, Any]], T], keep: bool = True) -> T:
    """`build` of the config `cfg` (Hydra's own node ignored), resolved once per config and
    process: `keep` holds the result for the next call, which a plan makes with keep=False and
    so takes it. Every run still builds its own attack objects."""
    config = {k: plain(v) for k, v in cfg.items() if k != "hydra"}
    key = (f"{build.__module__}.{build.__qualname__}", digest(config))
    spec = _RESOLVED.pop(key, None) or build(config)
    if keep:
        _RESOLVED[key] = spec
    return spec


def invalid_id(root: Any) -> str:
    """The run directory id of a config that does not resolve: its own folder, where the run
    then stops with the reason."""
    raw = OmegaConf.to_container(root, resolve=False)
    raw.pop("hydra", None)
    return "invalid-" + digest(raw)[:12]


def resolve(cfg: Any, keep: bool = True) -> RunSpec:
    """The specs of the run `cfg` describes."""
    return once(cfg, _resolve, keep)


@dataclass
class Target:
    spec: ModelSpec
    weights: WeightFile | None  # None: weights timm lacks and no checkpoint= was given
    skipped: str | None = None


@dataclass
class Plan:
    spec: RunSpec
    out_dir: Path
    runtime: Runtime
    data: ImageSet
    source_weights: WeightFile | None = None
    targets: list[Target] = field(default_factory=list)
    external: list[AdvSetInfo] = field(default_factory=list)  # folders to evaluate (adv_dir)
    present_of: int | None = None  # data.only_present: the clean images before the restriction

    @property
    def crafting(self) -> bool:
        return self.spec.attack is not None

    @property
    def attack(self) -> MIFGSM | None:
        return self.spec.attack

    @property
    def source(self) -> ModelSpec | None:
        return self.spec.source

    @property
    def identity(self) -> Identity:
        return self.spec.identity

    @property
    def config(self) -> dict[str, Any]:
        return self.spec.config


OFFLINE_TARGETS = (
    "Offline, targets=smoke (tiny random-weight models) or targets=none (craft and save only) "
    "need no weights."
)


def _asked_by(key: str) -> str:
    """'Target vit_base (of targets=paper, the default): ' when Hydra says which list it was."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return f"Target {key}: "
    choice = HydraConfig.get().runtime.choices.get("targets")
    default = ", the default" if choice == "paper" else ""
    return f"Target {key} (of targets={choice}{default}): "


def _external(spec: RunSpec) -> list[AdvSetInfo]:
    """The folders of adv_dir, described by their run records when they have them."""
    if spec.adv_dir and not spec.targets:
        raise UserError("adv_dir= evaluates against targets, but targets=none lists none.")
    external = [describe_folder(f) for f in spec.adv_dir]
    for info in external:
        present_stems(info.folder)  # refuses a folder that does not exist
    return external


def _only_present(data: ImageSet, external: list[AdvSetInfo]) -> ImageSet:
    """data.only_present: the clean images that every folder of adv_dir has (resolve refuses it
    for a crafting run)."""
    have = set.intersection(*(present_stems(info.folder) for info in external))
    keep = [i for i, s in enumerate(data.stems) if s in have]
    if not keep:
        raise UserError(
            f"None of the {len(data)} clean images has an adversarial image in every folder "
            f"of adv_dir (expected <clean stem>.png)."
        )
    return data.subset(keep, data.shard)


def _target_weights(specs: tuple[ModelSpec, ...], tf2torch_dir: str | None) -> list[Target]:
    targets = []
    for spec in specs:
        try:
            targets.append(Target(spec, resolve_weights(spec, tf2torch_dir)))
        except MissingCheckpoint as e:
            # Weights timm lacks: evaluate the other targets, show this cell as missing (not 0).
            log.warning("Skipping target %s: %s", spec.key, e)
            targets.append(Target(spec, None, str(e)))
        except UserError as e:  # no network, a bad file: say which target list asked for it
            raise UserError(f"{_asked_by(spec.key)}{e} {OFFLINE_TARGETS}") from e
    return targets


def _crafting_labels(spec: RunSpec, data: ImageSet, external: list[AdvSetInfo]) -> ImageSet:
    """An evaluation scores each image against the label its crafting run attacked: a
    source-labelled run's labels come from its folder (one set of labels for all folders)."""
    labelled = [i for i in external if i.identity and source_labelled_identity(i.identity.data)]
    if not labelled:
        if source_labelled(spec.data):
            raise UserError(
                "data.labels=source labels each image by the source's clean prediction, and an "
                "adv_dir= evaluation has no source: evaluate the folder of a run crafted with "
                "data.labels=source (its labels are read from that run), or use data.labels=random."
            )
        return data
    tables = [read_run_labels(Path(i.folder).parent, data.stems) for i in labelled]
    if any(not torch.equal(t, tables[0]) for t in tables[1:]):
        raise UserError(
            "The adv_dir= folders were crafted against different labels (source-labelled runs "
            "of different sources): evaluate them in separate runs."
        )
    return data.with_labels(tables[0])


def _data(spec: RunSpec, external: list[AdvSetInfo]) -> tuple[ImageSet, int | None]:
    """The clean images (checked), restricted for only_present and readied for the attack."""
    data = load_dataset(spec.data)
    if external:
        data = _crafting_labels(spec, data, external)
    present_of = None
    if spec.data.only_present:
        present_of = len(data)
        data = _only_present(data, external)
    if spec.attack is not None:
        spec.attack.check_data(*data.size)
        if spec.attack.admix is not None:
            data = data.checked_pool()
    return data, present_of


def make_plan(cfg: Any, out_dir: Path) -> Plan:
    spec = resolve(cfg, keep=False)
    runtime = Runtime.of(spec.settings)
    for model in ([spec.source] if spec.source else []) + list(spec.targets):
        check_model_name(model)
    external = _external(spec)
    data, present_of = _data(spec, external)
    tf2torch_dir = spec.settings.tf2torch_dir
    return Plan(
        spec=spec,
        out_dir=out_dir,
        runtime=runtime,
        data=data,
        source_weights=resolve_weights(spec.source, tf2torch_dir) if spec.source else None,
        targets=_target_weights(spec.targets, tf2torch_dir),
        external=external,
        present_of=present_of,
    )
