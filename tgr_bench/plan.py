"""From a composed config to the validated plan of one run.

Every input error (unknown model, bad attack setting, missing data, missing weights) surfaces
here, before the run directory is touched. Nothing is written; the only heavy work is reading
the clean images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tgr_bench.advsets import describe_folder
from tgr_bench.attacks import Attack, build_attack
from tgr_bench.data import DataSpec, ImageSet, load_dataset, present_stems
from tgr_bench.errors import UserError
from tgr_bench.models import (
    MissingCheckpoint,
    ModelSpec,
    Weights,
    check_model_name,
    resolve_weights,
)
from tgr_bench.record import AdvSetInfo, Identity
from tgr_bench.settings import Runtime

log = logging.getLogger(__name__)


def _container(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def adv_dirs(cfg: Any) -> list[str]:
    value = _container(cfg.get("adv_dir"))
    if not value:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def identity_of(cfg: Any) -> Identity:
    """The identity of the run `cfg` describes, from resolved values only (see record.py)."""
    data = DataSpec.from_cfg(_container(cfg.data))
    folders = adv_dirs(cfg)
    common = {
        "data": data.identity(),
        "seed": int(cfg.get("seed", 0)),
        "precision": str(cfg.get("precision", "fp32")),
        "shard": data.shard_of,
    }
    if folders:
        resolved = tuple(str(Path(f).expanduser().resolve()) for f in folders)
        return Identity(source=None, attack=None, params={}, adv_dir=resolved, **common)
    source = ModelSpec.from_cfg(cfg.source)
    attack = build_attack(cfg.attack, source.arch, source.key)
    return Identity(source=source.identity(), attack=attack.label, params=attack.params(), **common)


def target_specs(cfg: Any) -> list[ModelSpec]:
    specs = []
    for key, entry in (cfg.get("targets") or {}).items():
        # The dict key is what users override (targets.<key>.checkpoint=...): it names the model.
        specs.append(ModelSpec.from_cfg({**_container(entry), "key": key}))
    return specs


@dataclass
class Target:
    spec: ModelSpec
    weights: Weights | None  # None: weights timm lacks and no checkpoint= was given
    skipped: str | None = None


@dataclass
class Plan:
    out_dir: Path
    config: dict[str, Any]
    runtime: Runtime
    identity: Identity
    data_spec: DataSpec
    data: ImageSet
    attack: Attack | None = None
    source: ModelSpec | None = None
    source_weights: Weights | None = None
    targets: list[Target] = field(default_factory=list)
    external: list[AdvSetInfo] = field(default_factory=list)  # folders to evaluate (adv_dir)
    present_of: int | None = None  # data.only_present: the clean images before the restriction

    @property
    def crafting(self) -> bool:
        return self.attack is not None


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


def make_plan(cfg: Any, out_dir: Path) -> Plan:
    runtime = Runtime.from_cfg(cfg)
    identity = identity_of(cfg)
    folders = adv_dirs(cfg)
    source = None if folders else ModelSpec.from_cfg(cfg.source)
    attack = None if source is None else build_attack(cfg.attack, source.arch, source.key)
    specs = target_specs(cfg)
    if folders and not specs:
        raise UserError("adv_dir= evaluates against targets, but targets=none lists none.")
    for spec in ([source] if source else []) + specs:
        check_model_name(spec)
    data_spec = DataSpec.from_cfg(_container(cfg.data))
    data = load_dataset(data_spec)
    external = [describe_folder(f) for f in folders]
    for info in external:
        if not Path(info.folder).is_dir():
            raise UserError(f"Adversarial folder {info.folder} does not exist (adv_dir=...).")
    present_of = None
    if data_spec.only_present:
        if not folders:
            raise UserError("data.only_present=true applies to adv_dir= evaluations only.")
        have = set.intersection(*(present_stems(info.folder) for info in external))
        keep = [i for i, s in enumerate(data.stems) if s in have]
        if not keep:
            raise UserError(
                f"None of the {len(data)} clean images has an adversarial image in every folder "
                f"of adv_dir (expected <clean stem>.png)."
            )
        present_of = len(data)
        data = data.subset(keep, data.shard)
    if attack is not None:
        attack.check_data(*data.size)
        if attack.admix is not None:
            data = data.checked_pool()
    tf2torch_dir = cfg.get("tf2torch_dir")
    source_weights = resolve_weights(source, tf2torch_dir) if source else None
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
    return Plan(
        out_dir=out_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
        runtime=runtime,
        identity=identity,
        data_spec=data_spec,
        data=data,
        attack=attack,
        source=source,
        source_weights=source_weights,
        targets=targets,
        external=external,
        present_of=present_of,
    )
