"""Where training metrics go besides metrics.jsonl (the recipe's `report_to`): TensorBoard, W&B, trackio.

Each backend gets exactly the records metrics.jsonl gets, at the same steps and under the same names. A resumed
run continues the same logs: the Trainer logs only the steps after the checkpoint it resumed from, TensorBoard
hides what an interrupted attempt wrote after it (purge_step), and W&B/trackio continue the run whose id the
first attempt left in trackers.json and skip the steps that run already holds (they cannot drop them; a resume
trains those steps again to the same values on a CPU).
"""

from __future__ import annotations

import importlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from qalign.atomic import atomic_write_text
from qalign.errors import UserError
from qalign.layout import StagePaths

# report_to name -> the module it needs; the pip extra that installs it has the report_to name.
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_available(names: list[str]) -> None:
    """Refuse, before anything is written, a tracker whose package is not installed (exit 2 naming the extra)."""
    for name in names:
        try:
            importlib.import_module(EXTRAS[name])
        except ImportError:
            raise UserError(
                f'report_to: {name} is not installed; pip install "qalign[{name}]" (or remove it from report_to)'
            ) from None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, step aside (flags such as `skipped` are not curves)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    """One backend: open(run_name, config, resume_step), log(values, step), close()."""

    def __init__(self, paths: StagePaths) -> None:
        self.paths = paths
        self.held = 0
        """Steps below this one are already in the backend's run (from an interrupted attempt): not logged again."""

    def open(self, run_name: str, config: dict, resume_step: int) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def run_id(self, key: str, fresh: str, resume_step: int) -> str:
        """The id this stage's run had in an earlier attempt (when resuming), else `fresh`, recorded."""
        path = self.paths.trackers
        ids = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if resume_step == 0 or key not in ids:
            ids[key] = fresh
            self.paths.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(ids) + "\n")
        return ids[key]


class TensorBoard(Tracker):
    def open(self, run_name: str, config: dict, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides what an interrupted attempt wrote past the checkpoint; those steps are logged again.
        purge = resume_step + 1 if resume_step else None
        _after_earlier_logs(self.paths.tensorboard)
        self.writer = SummaryWriter(str(self.paths.tensorboard), purge_step=purge)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        # A killed run must not lose steps that came before its last checkpoint: write them out now.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _after_earlier_logs(folder: Path) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with the second the file was
    created in, then the host and the process id: an attempt that starts in the same second as the one it
    resumes, with a process id that sorts lower, would be read first and its steps hidden by the older file's.
    Waiting into the next second (under a second, once per attempt) puts it after every earlier one."""
    seconds = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*") if _stamped(p.name)]
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)


def _stamped(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 3 and parts[3].isdigit()


class WandB(Tracker):
    def open(self, run_name: str, config: dict, resume_step: int) -> None:
        import wandb

        run_id = self.run_id("wandb", uuid.uuid4().hex[:12], resume_step)
        try:
            self.run = wandb.init(
                # WANDB_PROJECT, WANDB_MODE, WANDB_DIR, WANDB_ENTITY... take precedence, as W&B users expect.
                project=None if os.environ.get("WANDB_PROJECT") else "qalign",
                dir=None if os.environ.get("WANDB_DIR") else str(self.paths.wandb_dir),
                name=run_name,
                id=run_id,
                resume="allow",
                config=config,
            )
        except Exception as exc:  # no API key, no network: say what to do instead of a traceback
            raise UserError(
                f"wandb could not start: {exc} (WANDB_MODE=offline logs without an account)"
            ) from None
        # run.step: the step of the next log; on a resumed online run, one past the last step W&B holds.
        self.held = self.run.step if resume_step else 0

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio(Tracker):
    def open(self, run_name: str, config: dict, resume_step: int) -> None:
        import trackio

        self.trackio = trackio
        # trackio continues a run by its name: the first attempt's name is kept for its resumes. TRACKIO_DIR,
        # TRACKIO_SPACE_ID... are trackio's own and left to it.
        name = self.run_id("trackio", f"{run_name}-{uuid.uuid4().hex[:6]}", resume_step)
        project = os.environ.get("TRACKIO_PROJECT", "qalign")
        run = trackio.init(project=project, name=name, config=config, resume="allow")
        # trackio has no public "last step"; its Run keeps the next one (0 when it cannot tell: nothing skipped).
        self.held = int(getattr(run, "_next_step", 0) or 0) if resume_step else 0

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


BACKENDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


class Trackers:
    """Every backend of `report_to` behind the one interface the Trainer calls."""

    def __init__(
        self,
        names: list[str],
        paths: StagePaths,
        run_name: str = "",
        config: dict | None = None,
        warn: Callable[[str], None] = print,
    ) -> None:
        self.backends = {name: BACKENDS[name](paths) for name in names}
        self.run_name, self.config, self.warn = run_name, config or {}, warn

    def open(self, resume_step: int) -> None:
        for backend in self.backends.values():
            backend.open(self.run_name, self.config, resume_step)

    def log(self, record: dict, step: int) -> None:
        values = scalars(record)
        for name, backend in list(self.backends.items()):
            if step < backend.held:
                continue
            try:
                backend.log(values, step)
            except Exception as exc:
                # A dashboard hiccup must not cost the training run: metrics.jsonl still has every record.
                self.warn(f"{name}: logging failed ({exc}); it gets no more metrics in this run")
                del self.backends[name]

    def close(self) -> None:
        for name, backend in self.backends.items():
            try:
                backend.close()
            except Exception as exc:
                self.warn(f"{name}: closing failed ({exc})")
