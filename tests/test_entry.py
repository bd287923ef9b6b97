"""The one entry of every console script: one line and an exit code, never a traceback."""

from __future__ import annotations

import signal

import pytest

from tgr_bench.entry import BEFORE_WORK, main_of
from tgr_bench.errors import Interrupted, Terminated, UserError


def raising(error: BaseException):
    def body() -> None:
        raise error

    return body


@pytest.mark.parametrize(
    "error,code,line",
    [
        (UserError("data.root is not set."), 2, "prog: error: data.root is not set."),
        (Interrupted("stopped by Ctrl-C: 3/8 images saved", 130), 130, "prog: stopped by Ctrl-C"),
        (KeyboardInterrupt(), 130, f"prog: {BEFORE_WORK}"),
        (Terminated(), 143, f"prog: {BEFORE_WORK}"),
    ],
)
def test_errors_a_user_causes_end_with_one_line_and_a_code(capsys, error, code, line):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as done:
            main_of("prog", raising(error))
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert done.value.code == code
    assert err.strip().splitlines() == [err.strip()] and err.startswith(line)


def test_a_bug_is_not_hidden():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(ZeroDivisionError):
            main_of("prog", lambda: 1 / 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
