"""`tgr-bench-list`: the attacks with their defaults and references, the modifiers and the
targeted options every attack takes, and the model keys."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from tgr_bench.attacks import build_attack
from tgr_bench.attacks.architectures import source_family
from tgr_bench.attacks.base import TARGET_MODES
from tgr_bench.attacks.modifiers import MODIFIERS
from tgr_bench.catalogue import model_keys, model_spec
from tgr_bench.config import choices, compose
from tgr_bench.defenses import DEFENSES
from tgr_bench.defenses.settings import defense_defaults
from tgr_bench.entry import main_of

PAPERS = {
    "patchout": "PatchOut: Wei et al., AAAI 2022",
    "di": "DI: Xie et al., Improving Transferability ... with Input Diversity, CVPR 2019",
    "ti": "TI: Dong et al., Evading Defenses ... Translation-Invariant Attacks, CVPR 2019",
    "si": "SI: Lin et al., Nesterov Accelerated Gradient and Scale Invariance, ICLR 2020",
    "admix": "Admix: Wang et al., Admix: Enhancing the Transferability ..., ICCV 2021",
}


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="tgr-bench-list",
        description="Every attack with its defaults and paper, the modifiers, and every model key.",
    ).parse_args(argv)  # no options: anything else is an error, not silently ignored
    main_of("tgr-bench-list", show)


def show() -> None:
    console = Console()
    attacks = Table(title="attacks (attack=<name>)", show_lines=True)
    for col in ("attack", "reference", "defaults"):
        attacks.add_column(col)
    groups = "|".join(choices("targets"))
    sources = Table(title=f"models (source=<key>, targets={groups})")
    for col in ("key", "timm model and weights", "weights"):
        sources.add_column(col)
    for choice in choices("attack"):
        cfg = compose([f"attack={choice}"])
        # Defaults as they resolve on the default source (the paper's ViT-B/16).
        source = model_spec(cfg.source.key)
        attack = build_attack(cfg.attack, source_family(source.arch), source.key, arch=source.arch)
        params = attack.params()
        attacks.add_row(choice, attack.reference, " ".join(f"{k}={v}" for k, v in params.items()))
    base = compose(["attack=mi"]).attack
    modifiers = Table(
        title="modifiers of every attack (attack.<name>.enabled=true) and targeted mode"
    )
    for col in ("setting", "paper", "defaults"):
        modifiers.add_column(col)
    for name in ("patchout", *MODIFIERS):
        settings = {k: v for k, v in base[name].items() if k != "enabled"}
        modifiers.add_row(
            f"attack.{name}", PAPERS[name], " ".join(f"{k}={v}" for k, v in settings.items())
        )
    modifiers.add_row(
        "attack.targeted, attack.target",
        "descend the cross-entropy toward a target label",
        f"targeted={base.targeted} target={base.target} (one of {', '.join(TARGET_MODES)})",
    )
    for key in model_keys():
        spec = model_spec(key)
        if not spec.pretrained:
            kind = "random (tests)"
        elif spec.robustbench:
            kind = f'RobustBench {spec.robustbench} (pip install "tgr-bench[robust]")'
        elif spec.torchvision:
            kind = f'torchvision {spec.torchvision} (pip install "tgr-bench[torchvision]")'
        elif spec.model is None:
            kind = f"converted TF-slim only: tf2torch_dir= ({spec.tfslim})"
        elif spec.tfslim:
            kind = f"timm port; tf2torch_dir= for the converted TF-slim file ({spec.tfslim})"
        else:
            kind = "timm pretrained"
        sources.add_row(key, spec.model or "-", kind)
    console.print(attacks)
    console.print(modifiers)
    console.print(sources)
    console.print(_defenses())


def _defenses() -> Table:
    table = Table(title="defenses (defenses=[<name>,...]; settings: defense.<name>.<key>=value)")
    for col in ("defense", "reference", "defaults"):
        table.add_column(col)
    for name, cls in DEFENSES.items():
        defaults = " ".join(f"{k}={v}" for k, v in defense_defaults()[name].items())
        table.add_row(name, getattr(cls, "reference", ""), defaults)
    return table


if __name__ == "__main__":
    main()
