"""Terminal output: one console, progress that suits a terminal or a log file, and messages
recorded in the job log without being printed twice.

On a terminal, rich progress bars show images/s and the time left. Piped output (tee, a Slurm
log) gets plain lines every few seconds instead, since a bar there shows nothing until the end,
and long lines (paths) are never wrapped.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger("tgr_bench")

PLAIN_EVERY_S = 10.0  # seconds between plain progress lines (and one at every 10%)


def make_console() -> Console:
    """stderr, so results piped from stdout stay clean; no hard wrapping off a terminal."""
    return Console(stderr=True, soft_wrap=not sys.stderr.isatty())


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.1f} images/s")


@dataclass
class _Task:
    description: str
    total: int
    completed: int = 0
    started: float = field(default_factory=time.monotonic)
    start_count: int = 0
    last_line: float = 0.0
    last_tenth: int = -1


class PlainProgress:
    """The subset of rich's Progress the runs use, as plain periodic lines."""

    def __init__(self, console: Console, every_s: float = PLAIN_EVERY_S) -> None:
        self.console = console
        self.every_s = every_s
        self.tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self.tasks:
            if kind is None and task.completed < task.total:
                self._line(task)

    def add_task(self, description: str, total: int, completed: int = 0) -> int:
        self.tasks.append(_Task(description, total, completed, start_count=completed))
        return len(self.tasks) - 1

    def advance(self, task_id: int, n: int) -> None:
        task = self.tasks[task_id]
        task.completed += n
        now = time.monotonic()
        tenth = 10 * task.completed // max(1, task.total)
        if now - task.last_line >= self.every_s or tenth != task.last_tenth:
            task.last_tenth = tenth
            self._line(task)

    def _line(self, task: _Task) -> None:
        task.last_line = now = time.monotonic()
        done = task.completed - task.start_count
        rate = done / (now - task.started) if now > task.started and done else None
        left = task.total - task.completed
        eta = f", {time.strftime('%H:%M:%S', time.gmtime(left / rate))} left" if rate else ""
        speed = f", {rate:.1f} images/s" if rate else ""
        pct = 100 * task.completed / max(1, task.total)
        self.console.print(
            f"{task.description}: {task.completed}/{task.total} ({pct:.0f}%){speed}{eta}",
            highlight=False,
        )


def progress(console: Console) -> Progress | PlainProgress:
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def to_log_files(level: int, message: str) -> None:
    """Record in the run's job log (cli.log) what was already printed, without printing it
    again on the console handler."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
