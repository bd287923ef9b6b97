"""`tgr-bench-variance`: a thin Hydra entry point around tgr_bench.variance.run."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from tgr_bench.console import to_log_files
from tgr_bench.errors import UserError
from tgr_bench.record import digest
from tgr_bench.variance.run import identity, run


def variance_id(*, _root_: DictConfig) -> str:
    """The analysis's identity as a short id: the default run directory, so the same command
    lands in the same place. A config that is not valid gets a directory of its own; the run
    then stops with the reason."""
    try:
        return digest(identity(_root_))[:12]
    except Exception:
        raw = OmegaConf.to_container(_root_, resolve=False)
        raw.pop("hydra", None)
        return "invalid-" + digest(raw)[:12]


OmegaConf.register_new_resolver("tgr_variance_id", variance_id, replace=True)


@hydra.main(version_base="1.3", config_path="pkg://tgr_bench.conf", config_name="variance")
def _main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        # One line, not a traceback: the message says how to fix the input.
        print(f"tgr-bench-variance: error: {e}", file=sys.stderr)
        to_log_files(logging.ERROR, str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        # Nothing is kept per image (one cheap pass): say so instead of a traceback.
        print("tgr-bench-variance: interrupted; re-run the command to start over.", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    from tgr_bench.cli import INFO_FLAGS, check_overrides, overrides_of

    try:
        if not INFO_FLAGS & set(sys.argv[1:]):
            plain = [
                o for o in overrides_of(sys.argv[1:]) if o.split("=")[0].split(".")[0] == "attack"
            ]
            if plain:
                raise UserError(
                    f"{' '.join(plain)}: tgr-bench-variance analyses several attacks, each set "
                    f"as attack_overrides.<name>.<key>=value (e.g. attack_overrides.mi.eps=8)."
                )
            check_overrides(sys.argv[1:], "variance", ("source", "data", "experiment"))
    except UserError as e:
        print(f"tgr-bench-variance: error: {e}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
