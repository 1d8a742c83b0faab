"""Progress when the output is a pipe: plain lines, no control codes, never silent for long."""

from __future__ import annotations

import io

from rich.console import Console

import qalign.progress as progress_module
from qalign.progress import Progress


def piped() -> tuple[Progress, io.StringIO]:
    out = io.StringIO()
    return Progress(Console(file=out), Console(file=io.StringIO())), out


def test_piped_bar_prints_a_plain_line_every_tenth_and_at_the_end():
    progress, out = piped()
    with progress.bar("merge", 25, 0, unit="layer") as bar:
        for done in range(1, 26):
            bar.update(done, {})
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert [line.split(" (")[0] for line in lines] == [f"merge layer {n}/25" for n in (*range(2, 25, 2), 25)]
    assert all(line.endswith("(0:00:00, eta 0:00:00)") for line in lines)


def test_piped_training_output_follows_log_every():
    progress, out = piped()
    with progress.bar("sft", 12, 0, every=5) as bar:
        for done in range(1, 13):
            bar.update(done, {"loss": 1.0})
    steps = [line.split(" (")[0] for line in out.getvalue().splitlines()]
    assert steps == ["sft step 5/12", "sft step 10/12", "sft step 12/12"]


def test_piped_bar_speaks_at_least_once_a_minute_between_tenths(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    progress, out = piped()
    with progress.bar("sft", 1000, 0) as bar:
        bar.update(1, {"loss": 2.5})
        clock[0] += 61
        bar.update(2, {"loss": 2.25})
        bar.update(3, {"loss": 2.0})
    # 30.5 s a step so far, 998 steps to go.
    assert out.getvalue().splitlines() == ["sft step 2/1000 (0:01:01, eta 8:27:19)  loss 2.2500"]


def test_piped_bar_eta_of_a_resumed_stage_counts_only_this_process_steps(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    progress, out = piped()
    with progress.bar("sft", 1000, 500) as bar:
        clock[0] += 100
        bar.update(600, {})
    assert out.getvalue().splitlines() == ["sft step 600/1000 (0:01:40, eta 0:06:40)"]
