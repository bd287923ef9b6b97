"""`tgr-bench`: a thin Hydra entry point around pipeline.run.

Before Hydra sees the command line, it is checked for typos (unknown options of a config group,
unknown keys), each answered with the closest known names; a sweep (`-m`) without
`hydra.sweep.dir=` is given a folder named after its overrides, so the same command lands in
the same place and resumes. Ctrl-C and SIGTERM end a run with one line saying what is saved.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tgr_bench import __version__
from tgr_bench.advsets import describe_folder
from tgr_bench.atomic import writable_folder
from tgr_bench.config import GROUPS, choices, compose, register
from tgr_bench.entry import guarded, main_of
from tgr_bench.errors import UserError
from tgr_bench.hashing import digest
from tgr_bench.pipeline import run
from tgr_bench.plan import invalid_id, resolve
from tgr_bench.schema import closest, keys_of, runtime_keys, unknown_key
from tgr_bench.settings import RunSettings

PROG = "tgr-bench"
USAGE = """tgr-bench: transfer attacks on vision transformers (TGR, CVPR 2023, and since).

Usage:
  tgr-bench experiment=smoke                                   # offline smoke run (CPU)
  tgr-bench source=vit_base attack=tgr data.root=/data/tgr1000  # craft + evaluate all targets
  tgr-bench source=pit_b attack=mi targets=vits data.limit=100 data.root=...
  tgr-bench -m attack=tgr attack.k=1,2,4,8 source=vit_base data.root=...   # a sweep
  tgr-bench adv_dir=/path/to/pngs data.root=/data/tgr1000 targets=cnns      # evaluate a folder
  tgr-bench ... targets=paper tf2torch_dir=/data/tf2torch      # the paper's TF-slim CNN weights
  tgr-bench ... 'defenses=[jpeg,rp]' defense.jpeg.quality=50   # columns T+<defense> (conf/defense/)
  tgr-bench-list       # attacks with every key, its default and meaning; model keys
  tgr-bench-report multirun/<sweep> --out results/mytable     # paper-style tables
Attacks take budgets in 0-255 pixel levels (attack.eps=16). More: README.md and docs/."""
FLAGS_WITH_VALUE = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
# Hydra's informational flags: the command line is shown, not run, so it is not checked.
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--version"}
# A comma outside brackets separates the values of a sweep (`attack.k=1,2` but `[a,b]`).
SWEEP_COMMA = re.compile(r",(?![^\[]*\])")


def run_dir(*, _root_: DictConfig) -> str:
    """The default run directory below outputs/: `<source>/<attack>/<run id>` for a crafting
    run, `eval/<folder>/<run id>` for an evaluation of adversarial folders (the folder named by
    its run record's source, attack and id when it has one). The run id is the run's identity,
    so re-running a command resumes in the same place and a different setting never does. A
    config that is not valid gets a directory of its own; the run then stops with the reason."""
    try:
        spec = resolve(_root_)
        ident = spec.identity
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
        return f"invalid/{invalid_id(_root_)}"


OmegaConf.register_new_resolver("tgr_run_dir", run_dir, replace=True)


@hydra.main(version_base="1.3", config_path="pkg://tgr_bench.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    with guarded(PROG):
        run(cfg)


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


def _check_output_dir(key: str, value: str) -> None:
    """hydra.run.dir / hydra.sweep.dir: empty (an unset shell variable) or the root would put
    the run's files among others; inside a file or an unwritable folder, Hydra would fail with
    a traceback."""
    value = value.strip().strip("\"'")  # a quoted value, as Hydra reads it
    if value.startswith("~"):
        raise UserError(
            f"{key}={value}: Hydra does not expand ~, so the run would land in a folder named "
            f"'~' here; write the path out, e.g. {key}=$HOME{value[1:]} (the shell expands it)."
        )
    if not value or Path(value).expanduser().resolve() == Path("/"):
        raise UserError(
            f"{key}={value!r}: an empty or root folder would mix the run's files with others "
            f"(an unset shell variable?); name the run's own folder, or leave {key} out."
        )
    writable_folder(Path(value), key)


def _check_parses(arg: str) -> None:
    """An override Hydra's grammar cannot read (a non-ASCII letter, a bracket in a path): one
    line with the quoted form that works; the output folders checked first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    key, _, value = arg.partition("=")
    if key in ("hydra.run.dir", "hydra.sweep.dir"):
        _check_output_dir(key, value)  # before the grammar: `~` has a fix of its own
    try:
        OverridesParser.create().parse_overrides([arg])
    except OverrideParseException:
        raise UserError(
            f"{arg}: Hydra cannot read this value unquoted; quote it, in the shell: "
            f"'{key}=\"{value}\"'"
        ) from None


def _check_options(group: str, value: str) -> None:
    known = choices(group)
    for option in SWEEP_COMMA.split(value):
        option = option.strip()
        if option and option != "null" and option not in known:
            raise UserError(
                f"{group}={option}: no such {group}. {closest(option, known)}"
                f"The options of {group} are: {', '.join(known)}."
            )


def _note_ignored(overrides: list[str]) -> None:
    """Attack settings given with adv_dir= are pointed out: often a command's shared
    overrides, they cannot change images that exist."""
    if any(o.startswith("adv_dir=") for o in overrides):
        attack = [o for o in overrides if o.partition("=")[0].split(".")[0] == "attack"]
        if attack:
            print(
                f"{PROG}: note: {' '.join(attack)} ignored: adv_dir= evaluates images that "
                f"exist, and the folders' run records say how they were crafted.",
                file=sys.stderr,
            )


def _owners(group: str, leaf: str) -> str:
    """'Keys like k belong to attack=tgr': an attack key of another attack."""
    from tgr_bench.attacks import ATTACKS

    if group != "attack":
        return ""
    owners = [f"attack={n}" for n, cls in ATTACKS.items() if closest(leaf, keys_of(cls.Settings))]
    return (
        f"Keys like {leaf} belong to {', '.join(owners)}; choose one of those. " if owners else ""
    )


def check_overrides(
    argv: Sequence[str], config_name: str = "config", groups_of: Sequence[str] = GROUPS
) -> None:
    """Unknown options of a config group and unknown keys, with the closest known names; the
    checks Hydra answers with a traceback, or with a wrong fix (`+attack.kk=`)."""
    overrides = overrides_of(argv)
    _note_ignored(overrides)
    groups, keys = [], []
    for arg in overrides:
        _check_parses(arg)  # the output folders too
        key, _, value = arg.partition("=")
        if key.startswith(("+", "~", "hydra")) or "/" in key:
            continue  # additions, deletions and Hydra's own settings are Hydra's business
        if key in groups_of:
            _check_options(key, value)
            groups.append(f"{key}={SWEEP_COMMA.split(value)[0]}")
        else:
            keys.append((key, arg))
    if keys:
        _check_keys(compose(groups, config_name), keys, groups_of)


def _check_keys(cfg: DictConfig, keys: list[tuple[str, str]], groups_of: Sequence[str]) -> None:
    for key, arg in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not OmegaConf.is_dict(node) or leaf in node:
            continue
        hint = _owners(parent, leaf) if parent in groups_of else ""
        raise UserError(f"{arg}: {unknown_key(key, [str(k) for k in node], hint)}")


def _value_order(value: str) -> tuple[int, float, str]:
    """Numbers by value, then texts: 1,2,16 stays in that order."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def with_sweep_dir(argv: list[str]) -> list[str]:
    """A sweep without hydra.sweep.dir= gets `multirun/<hash of its overrides>`: the same
    command, with its overrides and values in any order, lands in the same folder, where each
    job resumes as a single run does. Settings that change no image do not move it."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    overrides = overrides_of(argv)
    if any(o.startswith("hydra.sweep.dir=") for o in overrides):
        return argv
    runtime = runtime_keys(RunSettings)
    kept = sorted(
        f"{key}={','.join(sorted(SWEEP_COMMA.split(value), key=_value_order))}"
        for key, _, value in (o.partition("=") for o in overrides)
        if key.lstrip("+~") not in runtime and not key.startswith(("hydra.", "hydra/"))
    )
    return [*argv, f"hydra.sweep.dir=multirun/{digest(kept)[:12]}"]


def help_text(overrides: list[str]) -> str:
    """--help: the usage, each group's options and the config these overrides compose to."""
    groups = "\n".join(f"{g}: {', '.join(choices(g))}" for g in GROUPS)
    config = OmegaConf.to_yaml(compose(overrides))
    return (
        f"{USAGE}\n\n== Config groups (group=option) ==\n{groups}\n\n"
        f"== Config (override any key: foo.bar=value) ==\n{config}\n"
        f"Hydra's own options: tgr-bench --hydra-help"
    )


def _start() -> None:
    register()
    args = sys.argv[1:]
    if "--version" in args:
        print(f"{PROG} {__version__}")
        return
    if {"--help", "-h"} & set(args):
        print(help_text([o for o in overrides_of(args) if not o.startswith("hydra")]))
        return
    if not INFO_FLAGS & set(sys.argv[1:]):
        check_overrides(sys.argv[1:])
    sys.argv = with_sweep_dir(sys.argv)
    _main()


def main() -> None:
    main_of(PROG, _start)


if __name__ == "__main__":
    main()
