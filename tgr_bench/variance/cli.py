"""`tgr-bench-variance`: a thin Hydra entry point around tgr_bench.variance.run."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from tgr_bench.cli import INFO_FLAGS, check_overrides, overrides_of
from tgr_bench.config import register
from tgr_bench.entry import guarded, main_of
from tgr_bench.errors import UserError
from tgr_bench.variance.run import run, variance_id

PROG = "tgr-bench-variance"
OmegaConf.register_new_resolver("tgr_variance_id", variance_id, replace=True)


@hydra.main(version_base="1.3", config_path="pkg://tgr_bench.conf", config_name="variance")
def _main(cfg: DictConfig) -> None:
    with guarded(PROG):
        run(cfg)


def _start() -> None:
    register()
    if not INFO_FLAGS & set(sys.argv[1:]):
        plain = [o for o in overrides_of(sys.argv[1:]) if o.split("=")[0].split(".")[0] == "attack"]
        if plain:
            raise UserError(
                f"{' '.join(plain)}: tgr-bench-variance analyses several attacks, each set "
                f"as attack_overrides.<name>.<key>=value (e.g. attack_overrides.mi.eps=8)."
            )
        check_overrides(sys.argv[1:], "variance", ("source", "data", "experiment"))
    _main()


def main() -> None:
    main_of(PROG, _start)


if __name__ == "__main__":
    main()
