"""`tgr-bench`: a thin Hydra entry point around pipeline.run.

Before Hydra sees the command line, it is checked for typos (unknown options of a config group,
unknown keys), each answered with the closest known names; a sweep (`-m`) without
`hydra.sweep.dir=` is given a folder named after its overrides, so the same command lands in
the same place and resumes. Ctrl-C and SIGTERM end a run with one line saying what is saved.
"""

from __future__ import annotations

import difflib
import logging
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tgr_bench.advsets import describe_folder
from tgr_bench.console import to_log_files
from tgr_bench.errors import Interrupted, Terminated, UserError, exit_code_of
from tgr_bench.pipeline import run
from tgr_bench.plan import identity_of
from tgr_bench.record import digest

GROUPS = ("attack", "source", "targets", "data", "experiment")
# Settings that change no image and no table: a sweep over them keeps its folder.
RUNTIME_KEYS = ("device", "batch_size", "eval_batch_size", "cache_dir", "tf2torch_dir")
FLAGS_WITH_VALUE = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
# Hydra's informational flags: the command line is shown, not run, so it is not checked.
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "--cfg", "-c"}


def _invalid(root: DictConfig) -> str:
    raw = OmegaConf.to_container(root, resolve=False)
    raw.pop("hydra", None)
    return "invalid-" + digest(raw)[:12]


def run_dir(*, _root_: DictConfig) -> str:
    """The default run directory below outputs/: `<source>/<attack>/<run id>` for a crafting
    run, `eval/<folder>/<run id>` for an evaluation of adversarial folders (the folder named by
    its run record's source, attack and id when it has one). The run id is the run's identity,
    so re-running a command resumes in the same place and a different setting never does. A
    config that is not valid gets a directory of its own; the run then stops with the reason."""
    try:
        ident = identity_of(_root_)
        if ident.adv_dir:
            infos = [describe_folder(f) for f in ident.adv_dir]
            first = infos[0]
            name = (
                f"{first.source}-{first.attack}-{first.run_id}"
                if first.identity is not None
                else f"external-{first.attack}"
            )
            more = f"+{len(infos) - 1}" if len(infos) > 1 else ""
            return f"eval/{name}{more}/{ident.run_id}"
        return f"{(ident.source or {}).get('key')}/{ident.attack}/{ident.run_id}"
    except Exception:
        return f"invalid/{_invalid(_root_)}"


def run_id(*, _root_: DictConfig) -> str:
    """The run identity's short id (see record.Identity)."""
    try:
        return identity_of(_root_).run_id
    except Exception:
        return _invalid(_root_)


OmegaConf.register_new_resolver("tgr_run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("tgr_run_id", run_id, replace=True)


@hydra.main(version_base="1.3", config_path="pkg://tgr_bench.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        # A short message, not a traceback: the message says how to fix the input.
        print(f"tgr-bench: error: {e}", file=sys.stderr)
        to_log_files(logging.ERROR, str(e))
        sys.exit(2)
    except Interrupted as e:
        print(f"tgr-bench: {e}", file=sys.stderr)
        to_log_files(logging.WARNING, str(e))
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, Terminated) as e:  # before any work: nothing written
        message = "stopped before any work; nothing was written."
        print(f"tgr-bench: {message}", file=sys.stderr)
        to_log_files(logging.WARNING, message)
        sys.exit(exit_code_of(e))


# ---- the command line, before Hydra ------------------------------------------------------------
def overrides_of(argv: Sequence[str]) -> list[str]:
    """The `key=value` overrides of a command line (not flags, not their values)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-") and "=" in arg:
            out.append(arg)
    return out


def _closest(word: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f"Did you mean {' or '.join(near)}? " if near else ""


def _check_output_dir(key: str, value: str) -> None:
    """hydra.run.dir / hydra.sweep.dir inside a file: Hydra would fail with a traceback."""
    path = Path(value).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{key}={value}: {p} is a file; choose a folder for the run.")
            return


def check_overrides(
    argv: Sequence[str], config_name: str = "config", groups_of: Sequence[str] = GROUPS
) -> None:
    """Unknown options of a config group and unknown keys, with the closest known names; the
    checks Hydra answers with a traceback, or with a wrong fix (`+attack.kk=`). Attack settings
    given with adv_dir= are pointed out: an evaluation of existing images ignores them."""
    from hydra import compose, initialize_config_module

    from tgr_bench.catalogue import CONFIG_MODULE, choices

    groups: list[str] = []
    keys: list[tuple[str, str]] = []
    overrides = overrides_of(argv)
    if any(o.startswith("adv_dir=") for o in overrides):
        attack = [o for o in overrides if o.partition("=")[0].split(".")[0] == "attack"]
        if attack:  # often a command's shared overrides; said, not refused
            print(
                f"tgr-bench: note: {' '.join(attack)} ignored: adv_dir= evaluates images that "
                f"exist, and the folders' run records say how they were crafted.",
                file=sys.stderr,
            )
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            _check_output_dir(key, value)
        if key.startswith(("+", "~", "hydra")) or "/" in key:
            continue  # additions, deletions and Hydra's own settings are Hydra's business
        if key in groups_of:
            known = choices(key)
            for option in re.split(r",(?![^\[]*\])", value):
                option = option.strip()
                if option and option != "null" and option not in known:
                    raise UserError(
                        f"{key}={option}: no such {key}. {_closest(option, known)}"
                        f"The options of {key} are: {', '.join(known)}."
                    )
            groups.append(f"{key}={value.split(',')[0]}")
        else:
            keys.append((key, arg))
    if not keys:
        return
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name, overrides=groups)
    for key, arg in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not OmegaConf.is_dict(node) or leaf in node:
            continue
        siblings = [str(k) for k in node]
        where = f"{parent}." if parent else ""
        near = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.5)
        hint = f"Did you mean {' or '.join(where + n for n in near)}? " if near else ""
        if parent in groups_of and parent == "attack" and not near:
            hint = _other_options(parent, leaf, groups)
        raise UserError(
            f"{arg}: there is no key {key}. {hint}The keys of {parent or 'the config'} are: "
            f"{', '.join(siblings)}."
        )


def _other_options(group: str, leaf: str, groups: list[str]) -> str:
    """'k is a key of attack=tgr': the key belongs to another option of the group."""
    from hydra import compose, initialize_config_module

    from tgr_bench.catalogue import CONFIG_MODULE, choices

    owners = []
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for option in choices(group):
            node = compose("config", overrides=[f"{group}={option}"])[group]
            if difflib.get_close_matches(leaf, [str(k) for k in node], n=1, cutoff=0.5):
                owners.append(f"{group}={option}")
    return (
        f"Keys like {leaf} belong to {', '.join(owners)}; choose one of those. " if owners else ""
    )


def with_sweep_dir(argv: list[str]) -> list[str]:
    """A sweep without hydra.sweep.dir= gets `multirun/<hash of its overrides>`: the same
    command lands in the same folder, where each job resumes as a single run does. Settings that
    change no image (device, batch sizes, caches, tf2torch_dir) do not move it."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    overrides = overrides_of(argv)
    if any(o.startswith("hydra.sweep.dir=") for o in overrides):
        return argv
    kept = sorted(
        o
        for o in overrides
        if o.partition("=")[0].lstrip("+~") not in RUNTIME_KEYS
        and not o.startswith(("hydra.", "hydra/"))
    )
    return [*argv, f"hydra.sweep.dir=multirun/{digest(kept)[:12]}"]


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main() -> None:
    try:
        if not INFO_FLAGS & set(sys.argv[1:]):
            check_overrides(sys.argv[1:])
    except UserError as e:
        print(f"tgr-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = with_sweep_dir(sys.argv)
    signal.signal(signal.SIGTERM, _terminate)
    _main()


if __name__ == "__main__":
    main()
