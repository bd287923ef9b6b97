"""`tgr-bench`: a thin Hydra entry point around pipeline.run."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from tgr_bench.errors import UserError
from tgr_bench.pipeline import run
from tgr_bench.plan import identity_of
from tgr_bench.record import digest

log = logging.getLogger("tgr_bench")


def run_id(*, _root_: DictConfig) -> str:
    """The run's identity as a short id: the default run directory, so re-running the same
    command resumes in the same place (and a different setting never does). A config that is
    not valid gets a directory of its own; the run then stops with the reason."""
    try:
        return identity_of(_root_).run_id
    except Exception:
        raw = OmegaConf.to_container(_root_, resolve=False)
        raw.pop("hydra", None)
        return "invalid-" + digest(raw)[:12]


OmegaConf.register_new_resolver("tgr_run_id", run_id, replace=True)


@hydra.main(version_base="1.3", config_path="pkg://tgr_bench.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        # A short message, not a traceback: the message says how to fix the input.
        print(f"tgr-bench: error: {e}", file=sys.stderr)
        _to_log_files(logging.ERROR, str(e))
        sys.exit(2)


def _to_log_files(level: int, message: str) -> None:
    """Record in the run's job log what was already printed, without printing it twice."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
