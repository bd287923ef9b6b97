"""`tgr-bench-list`: the attacks with their defaults and references, and the model keys."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from tgr_bench.attacks import build_attack
from tgr_bench.catalogue import CONFIG_MODULE, choices


def main() -> None:
    console = Console()
    attacks = Table(title="attacks (attack=<name>)", show_lines=True)
    for col in ("attack", "reference", "defaults"):
        attacks.add_column(col)
    sources = Table(title="models (source=<key>, targets=vits|cnns|defended|paper|smoke|none)")
    for col in ("key", "timm model and weights", "weights"):
        sources.add_column(col)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for choice in choices("attack"):
            cfg = compose("config", overrides=[f"attack={choice}"])
            # Defaults as they resolve on the default source (the paper's ViT-B/16).
            attack = build_attack(cfg.attack, cfg.source.model, cfg.source.key)
            params = attack.params()
            attacks.add_row(
                choice, attack.reference, " ".join(f"{k}={v}" for k, v in params.items())
            )
        for key in choices("source"):
            src = OmegaConf.to_container(compose("config", overrides=[f"source={key}"]).source)
            kind = (
                "checkpoint= required"
                if src["requires_checkpoint"]
                else "pretrained"
                if src["pretrained"]
                else "random (tests)"
            )
            sources.add_row(key, src["model"], kind)
    console.print(attacks)
    console.print(sources)


if __name__ == "__main__":
    main()
