"""The run folder: where each stage's outputs live, which adapter a command uses, and who may write there.

    <output_dir>/
      .qalign-run              marks a folder qalign created (nothing else is ever written into a foreign one)
      .qalign-lock             while a process writes this run: held (flock), names it for the refusal
      sft/ dpo/                one folder a stage: adapter/, checkpoints/, metrics.jsonl, recipe.yaml,
                               and dpo/reference/ for the cached reference log-probs; with report_to,
                               tensorboard/ (event files), wandb/ (W&B's local files) and trackers.json
      merged/                  qalign merge's default output
      gguf/                    qalign export's default output (with a recipe's export section)
      report.png               qalign report's default output

No other module spells these names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qalign import __version__
from qalign.atomic import atomic_write_text
from qalign.errors import UserError

RUN_MARKER = ".qalign-run"
LOCK_FILE = ".qalign-lock"
STAGES = ("sft", "dpo")


@dataclass(frozen=True)
class StagePaths:
    """The files of one stage of a run."""

    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def reference(self) -> Path:
        return self.root / "reference"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_dir(self) -> Path:
        """W&B's `dir`: it writes its local files into a `wandb/` folder inside."""
        return self.root

    @property
    def trackers(self) -> Path:
        """The tracker run ids of this attempt, so a resume continues the same W&B/trackio run."""
        return self.root / "trackers.json"

    def has_adapter(self) -> bool:
        return is_adapter(self.adapter)


@dataclass(frozen=True)
class RunLayout:
    out: Path

    def stage(self, name: str) -> StagePaths:
        return StagePaths(self.out / name)

    @property
    def merged(self) -> Path:
        return self.out / "merged"

    @property
    def gguf(self) -> Path:
        return self.out / "gguf"

    @property
    def report(self) -> Path:
        return self.out / "report.png"


def merged_folder(recipe: object) -> Path:
    """Where a recipe's merged model goes: merge.out, else the run's merged/."""
    spec = getattr(recipe, "merge", None)
    return Path(spec.out) if spec is not None and spec.out else RunLayout(recipe.out).merged  # type: ignore[attr-defined]


def gguf_folder(recipe: object) -> Path:
    """Where a recipe's GGUF files go: export.out, else the run's gguf/."""
    spec = getattr(recipe, "export", None)
    return Path(spec.out) if spec is not None and spec.out else RunLayout(recipe.out).gguf  # type: ignore[attr-defined]


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def find_adapter(recipe: object, stage: str | None, hint: str = "train first (qalign run)") -> Path:
    """The adapter of `stage`, or of the last stage that has one (dpo, then sft)."""
    layout = RunLayout(recipe.out)  # type: ignore[attr-defined]
    for name in [stage] if stage else reversed(STAGES):
        if layout.stage(name).has_adapter():
            return layout.stage(name).adapter
    which = f"the {stage} stage" if stage else "any stage"
    raise UserError(f"{recipe.source}: no adapter from {which} in {recipe.out}; {hint}")  # type: ignore[attr-defined]


def starting_adapter(recipe: object) -> Path | None:
    """Where DPO starts: dpo.init_adapter, else the SFT stage's finished adapter, else none (the base)."""
    init = recipe.dpo.init_adapter  # type: ignore[attr-defined]
    if init is not None:
        return Path(init)
    sft = RunLayout(recipe.out).stage("sft")  # type: ignore[attr-defined]
    return sft.adapter if sft.has_adapter() else None


def check_output_dir(recipe: object) -> None:
    """Refuse an output_dir that is a file or holds something other than a qalign run. Reads only."""
    out: Path = recipe.out  # type: ignore[attr-defined]
    if out.exists() and not out.is_dir():
        raise UserError(f"{recipe.source}: output_dir {out} is a file, not a folder")  # type: ignore[attr-defined]
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
        raise UserError(
            f"{recipe.source}: output_dir {out} already holds files that are not a qalign run; "  # type: ignore[attr-defined]
            "choose another output_dir"
        )


@contextlib.contextmanager
def claim_output_dir(recipe: object) -> Iterator[RunLayout]:
    """Create the run folder (marked as qalign's) and hold its lock for the body.

    A second process writing the same run is refused while the first holds the lock; the kernel drops a flock
    when its holder dies, so a killed run never blocks the next one. If this call created the folder and the body
    fails before anything but the marker and lock is written, the folder is removed again: a failed start leaves
    the disk as it found it."""
    check_output_dir(recipe)
    out: Path = recipe.out  # type: ignore[attr-defined]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _lock(out):
            if not (out / RUN_MARKER).exists():
                marker = {"qalign": __version__, "name": recipe.name}  # type: ignore[attr-defined]
                atomic_write_text(out / RUN_MARKER, json.dumps(marker) + "\n")
            yield RunLayout(out)
    except BaseException:
        if created and {p.name for p in out.iterdir()} <= {RUN_MARKER, LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per folder is then the user's to keep
        yield
        return
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{out} is in use by another qalign process (pid {holder}); wait for it to finish, or stop it "
                "(it keeps its last checkpoint) and run this again"
            ) from None
        # The holder before us unlinks the file as it lets go: a lock on that old file guards nothing.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        # Unlinked while still held, so the folder is left as it was found; closing releases the flock, and
        # a killed holder's lock goes with its process.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
