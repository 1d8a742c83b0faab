"""What a run shows the user: a Rich progress bar with ETA and live metrics, info lines and warnings.

When the output is not a terminal (CI, `nohup`, a pipe) the bar becomes a plain line every tenth of the run
and at least once a minute in between, so logs stay readable and a long stretch never looks stuck.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress


def format_duration(seconds: float) -> str:
    """h:mm:ss, as the bar shows it."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def format_metrics(values: dict) -> str:
    parts = []
    for key, value in values.items():
        if key == "lr":
            parts.append(f"lr {value:.2e}")
        elif key == "tokens_per_s":
            parts.append(f"{value:,.0f} tok/s")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class Progress:
    def __init__(self, console: Console | None = None, err_console: Console | None = None) -> None:
        self.console = console or Console()
        self.err = err_console or Console(stderr=True)
        self.warnings: list[str] = []

    @classmethod
    def silent(cls) -> Progress:
        """Shows nothing: a worker other than rank 0 leaves the output to rank 0 (its errors still count)."""
        return cls(Console(quiet=True), Console(stderr=True, quiet=True))

    def info(self, message: str) -> None:
        self.console.print(escape(message))

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.err.print(f"[yellow]warning:[/yellow] {escape(message)}")

    @contextmanager
    def bar(
        self, name: str, total: int, start: int, unit: str = "step", every: int | None = None
    ) -> Iterator[_Bar]:
        """A live bar on a terminal; piped, a plain line every `every` units (default: each tenth of the total)
        and at least once a minute."""
        if not self.console.is_terminal:
            yield _PlainBar(self, name, total, start, unit, every)
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
        )
        with RichProgress(*columns, console=self.console) as rich:
            task = rich.add_task(name, total=total, completed=start, metrics="")
            yield _RichBar(rich, task)


class _Bar:
    def update(self, step: int, metrics: dict) -> None:
        raise NotImplementedError


class _RichBar(_Bar):
    def __init__(self, rich: RichProgress, task: int) -> None:
        self.rich, self.task = rich, task

    def update(self, step: int, metrics: dict) -> None:
        self.rich.update(self.task, completed=step, metrics=escape(format_metrics(metrics)))


class _PlainBar(_Bar):
    EVERY_S = 60.0

    def __init__(
        self, progress: Progress, name: str, total: int, start: int, unit: str, every: int | None
    ) -> None:
        self.progress, self.name, self.total, self.start, self.unit = progress, name, total, start, unit
        self.every = every or max(1, total // 10)
        self.started = self.last = time.monotonic()

    def update(self, step: int, metrics: dict) -> None:
        now = time.monotonic()
        if step % self.every and step != self.total and now - self.last < self.EVERY_S:
            return
        self.last = now
        seconds = now - self.started
        # The ETA from this process's own pace: a resumed run's earlier steps took no time here.
        done = step - self.start
        eta = format_duration(seconds / done * (self.total - step)) if done > 0 else "?"
        line = f"{self.name} {self.unit} {step}/{self.total} ({format_duration(seconds)}, eta {eta})"
        self.progress.info("  ".join(part for part in (line, format_metrics(metrics)) if part))
