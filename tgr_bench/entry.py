"""One entry for every console script: a user error is one line on stderr and exit code 2, a
run stopped by Ctrl-C or SIGTERM one line saying what is saved and exit code 130 / 143, and
both are recorded in the job log (cli.log) when a Hydra job has one. Never a traceback for
something the user can fix."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from tgr_bench.console import to_log_files
from tgr_bench.errors import Interrupted, Terminated, UserError, exit_code_of

BEFORE_WORK = "stopped before any work; nothing was written."


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def say(prog: str, message: str, level: int = logging.ERROR, code: int = 2) -> NoReturn:
    """Print one line as `prog`, record it in the job log, exit with `code`."""
    prefix = "error: " if level >= logging.ERROR else ""
    print(f"{prog}: {prefix}{message}", file=sys.stderr)
    to_log_files(level, message)
    sys.exit(code)


@contextlib.contextmanager
def guarded(prog: str) -> Iterator[None]:
    """Turn the errors a user can cause into one line and an exit code."""
    try:
        yield
    except UserError as e:
        say(prog, str(e))
    except Interrupted as e:
        say(prog, str(e), logging.WARNING, e.exit_code)
    except (KeyboardInterrupt, Terminated) as e:  # before any work: nothing written
        say(prog, BEFORE_WORK, logging.WARNING, exit_code_of(e))


def main_of(prog: str, body: Callable[[], Any]) -> None:
    """Run a console script's `body` with SIGTERM raised like Ctrl-C and the errors guarded."""
    signal.signal(signal.SIGTERM, _terminate)
    with guarded(prog):
        body()
