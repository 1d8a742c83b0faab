"""metrics.jsonl: one JSON record per logged step, appended as training goes, reading as one uninterrupted run
after any number of resumes."""

from __future__ import annotations

import json
from pathlib import Path

from qalign.atomic import atomic_write_text


def read_records(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl (the final one included), skipping a line torn by a crash mid-write."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def keep_until(self, step: int) -> None:
        """Drop records past `step` (a resumed run logs them again) and any final record."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(record, dict) and record.get("step", 0) <= step and "final" not in record:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def mean_record(window: list[dict]) -> dict:
    """The last step's record, with each metric the mean over the steps of `window` (what a `log_every`
    record stands for); counters and settings (step, lr, epoch, skipped_steps) are the last step's."""
    last = dict(window[-1])
    for key, value in last.items():
        if key in ("step", "lr", "epoch", "skipped_steps", "skipped") or not isinstance(value, float):
            continue
        values = [r[key] for r in window if isinstance(r.get(key), float)]
        last[key] = sum(values) / len(values)
    return last
