"""Training checkpoints: folders `step-<N>` that a crash at any moment leaves either complete or recognisably
torn, the training state written into them (adapter, optimizer, scheduler, loss scaler, RNG), and its restore.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qalign.atomic import (
    OLD_PREFIX,
    TMP_PREFIX,
    atomic_dir,
    atomic_write_text,
    atomic_write_with,
    fsync_dir,
    remove_path,
    tmp_name,
)

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
POINTER_FILE = "latest"
_STEP_RE = re.compile(r"step-(\d+)")


def save_torch(obj: object, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically. Keep ``obj`` to tensors and plain containers so that
    :func:`load_torch` can read it back with ``weights_only=True``."""
    atomic_write_with(path, lambda f: torch.save(obj, f))


def load_torch(path: Path) -> object:
    """Load a file written by :func:`save_torch` without executing arbitrary pickled code."""
    return torch.load(path, weights_only=True, map_location="cpu")


def capture_rng_state() -> dict:
    """Snapshot every global RNG training touches, in a form ``weights_only`` unpickling accepts.

    numpy arrays are not on torch's safe-unpickling allow-list, so numpy's key array becomes a list of ints.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict = {
        "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": np_keys.tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`.

    CUDA states are restored for the devices that exist now; a run resumed on fewer (or no) GPUs cannot
    reproduce the missing devices' streams anyway, and refusing to resume would be worse.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state(
        (
            nps["name"],
            np.asarray(nps["keys"], dtype=np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for device, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _manifest(folder: Path) -> dict[str, int]:
    files: dict[str, int] = {}
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            p = Path(dirpath, name)
            files[p.relative_to(folder).as_posix()] = p.stat().st_size
    return dict(sorted(files.items()))


class CheckpointManager:
    """Checkpoints as folders ``root/step-<N>``, plus a ``root/latest`` file naming the newest one for people
    (qalign itself finds the newest complete folder by scanning, which a crash cannot make stale).

    A checkpoint is complete when its ``trainer_state.json`` parses and every file listed in its manifest
    exists with the recorded size. One process is assumed to own ``root`` at a time.
    """

    def __init__(self, root: Path, keep: int = 2, warn: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.keep = keep
        self._warn = warn if warn is not None else log.warning
        self._warned: set[str] = set()

    def save(self, step: int, write: Callable[[Path], None], state: dict) -> Path:
        """Write checkpoint ``step``: ``write(tmpdir)`` fills the folder, then the manifest goes in last.

        Replaces an existing ``step-<step>``, points ``latest`` at it, prunes to the newest ``keep`` complete
        checkpoints (``keep <= 0`` keeps all) and clears leftovers of earlier interrupted saves.
        """
        step = operator.index(step)  # also accepts numpy ints, which json cannot serialise
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # The manifest and folder name are the source of truth; letting `state` override them would make a
        # checkpoint that complete() rejects or that claims the wrong step.
        if "files" in state or state.get("step", step) != step:
            raise ValueError("state must not contain 'files' or a 'step' different from the step argument")
        final = self.root / f"step-{step}"
        with atomic_dir(final, replace=True) as tmp:
            write(tmp)
            if (tmp / STATE_FILE).exists():
                raise ValueError(f"write() must not create {STATE_FILE}; it is written by the manager")
            content = {"step": step, **state, "files": _manifest(tmp)}
            # Written last and listing sizes, so a folder missing it, or whose files disagree with it, is
            # recognisably unfinished even if it was assembled by something other than atomic_dir.
            (tmp / STATE_FILE).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        atomic_write_text(self.root / POINTER_FILE, final.name + "\n")
        self._prune(keep_also=final)
        self._tidy()
        return final

    def _prune(self, keep_also: Path) -> None:
        if self.keep <= 0:
            return
        complete = self.complete()
        excess = len(complete) - self.keep
        for ckpt in complete:
            if excess <= 0:
                break
            if ckpt == keep_also:
                continue
            # Rename first so that a crash mid-delete leaves a `.tmp-*` folder to clear, not a half-deleted
            # step-N that would be reported as torn on every resume.
            doomed = self.root / tmp_name(ckpt.name)
            os.rename(ckpt, doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)
            excess -= 1

    def _tidy(self) -> None:
        self._recover_swaps()
        for entry in self.root.iterdir():
            finished_swap = entry.name.startswith(OLD_PREFIX) and self._old_target(entry).exists()
            if entry.name.startswith(TMP_PREFIX) or finished_swap:
                remove_path(entry)
        fsync_dir(self.root)

    def _old_target(self, aside: Path) -> Path:
        # `.old-<name>-<8 hex>` -> root/<name>
        return self.root / aside.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]

    def _recover_swaps(self) -> None:
        """Put back a checkpoint moved aside by atomic_dir(replace=True) if the crash came before the new one
        was renamed in; otherwise that step would simply vanish."""
        if not self.root.is_dir():
            return
        restored = False
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(OLD_PREFIX) and entry.is_dir():
                target = self._old_target(entry)
                if _step_of(target) is not None and not os.path.lexists(target):
                    os.rename(entry, target)
                    restored = True
        if restored:
            fsync_dir(self.root)

    @staticmethod
    def read_state(path: Path) -> dict:
        """The parsed ``trainer_state.json`` of checkpoint folder ``path``."""
        with open(Path(path) / STATE_FILE, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError(f"{Path(path) / STATE_FILE} does not hold a JSON object")
        return state

    def _problem(self, ckpt: Path) -> str | None:
        """Why ``ckpt`` is not a usable checkpoint, or None if it is complete."""
        if not (ckpt / STATE_FILE).is_file():
            return f"{STATE_FILE} missing"
        try:
            state = self.read_state(ckpt)
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            return f"{STATE_FILE} unreadable ({e})"
        if state.get("step") != _step_of(ckpt):
            return f"{STATE_FILE} says step {state.get('step')!r}"
        files = state.get("files")
        if not isinstance(files, dict):
            return f"{STATE_FILE} has no file manifest"
        for rel, size in files.items():
            rel_path = Path(rel)
            if rel_path.is_absolute() or ".." in rel_path.parts:
                return f"manifest entry {rel!r} points outside the checkpoint"
            p = ckpt / rel_path
            if not p.is_file():
                return f"{rel} missing"
            actual = p.stat().st_size
            if actual != size:
                return f"{rel} is {actual} bytes, expected {size}"
        return None

    def _report(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._warn(message)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first by step; incomplete ones are reported through ``warn``."""
        if not self.root.is_dir():
            return []
        found: list[tuple[int, Path]] = []
        for entry in self.root.iterdir():
            step = _step_of(entry)
            if step is None or not entry.is_dir():
                continue
            problem = self._problem(entry)
            if problem is None:
                found.append((step, entry))
            else:
                self._report(f"skipping torn checkpoint {entry}: {problem}")
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Reads only: call recover() first (under the run's lock) to
        put back a checkpoint that a crash left moved aside."""
        complete = self.complete()
        return complete[-1] if complete else None

    def recover(self) -> None:
        """Undo what a crash mid-save left behind: a checkpoint moved aside is put back, leftovers removed."""
        if self.root.is_dir():
            self._tidy()


def save_training_state(
    manager: CheckpointManager,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: dict,
    whole: tuple[dict, dict] | None = None,
) -> Path:
    """Checkpoint `step`: everything an exact resume needs, plus `state` in trainer_state.json. `whole`: the
    adapter's weights and the optimizer's state gathered from a model sharded over processes."""

    def write(folder: Path) -> None:
        # Only the trained adapter: DPO's live reference is a frozen copy of the starting one.
        weights, optimizer_state = whole if whole is not None else (None, optimizer.state_dict())
        model.save_pretrained(str(folder), selected_adapters=["default"], state_dict=weights)
        save_torch(optimizer_state, folder / "optimizer.pt")
        save_torch(scheduler.state_dict(), folder / "scheduler.pt")
        save_torch(capture_rng_state(), folder / "rng.pt")
        if scaler.is_enabled():
            save_torch(scaler.state_dict(), folder / "scaler.pt")

    return manager.save(step, write, state)


def restore_training_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    sharded: bool = False,
) -> dict:
    """Load checkpoint `folder` into the objects save_training_state wrote it from; returns its state. A model
    sharded over processes takes the same files (whole tensors), each rank keeping its shard."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    if sharded:
        from qalign.distributed import load_full_optimizer_state

        load_full_optimizer_state(model, optimizer, load_torch(folder / "optimizer.pt"))
    else:
        optimizer.load_state_dict(load_torch(folder / "optimizer.pt"))
    scheduler.load_state_dict(load_torch(folder / "scheduler.pt"))
    if scaler.is_enabled() and (folder / "scaler.pt").exists():
        scaler.load_state_dict(load_torch(folder / "scaler.pt"))
    restore_rng_state(load_torch(folder / "rng.pt"))
    return CheckpointManager.read_state(folder)
