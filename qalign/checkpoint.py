"""Crash-safe writing of files, folders and training checkpoints.

Every write here goes to a temporary name in the destination folder, is fsynced, and is then renamed into
place, so a crash, Ctrl-C or SIGKILL at any moment leaves either the old content or the new content, never a
mix. Renames are only atomic within one filesystem, which is why temporaries always live beside their target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import operator
import os
import random
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = [
    "CheckpointManager",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "fsync_dir",
    "load_torch",
    "restore_rng_state",
    "save_torch",
]

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# Folders moved aside while atomic_dir(replace=True) swaps in a new one. They get their own prefix because,
# unlike `.tmp-*` leftovers, one of them may be the only copy of a checkpoint if the crash came between the
# two renames, so CheckpointManager must put it back rather than delete it.
OLD_PREFIX = ".old-"

STATE_FILE = "trainer_state.json"
POINTER_FILE = "latest"
_STEP_RE = re.compile(r"step-(\d+)")


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, deletions) durable.

    A no-op on Windows, which cannot open directories, and on filesystems that reject fsync on them.
    """
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # Some network and FUSE filesystems refuse fsync on directories; there is nothing better to do there.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    # Windows' fsync (_commit) needs a writable handle; POSIX is happy with a read-only one, which also
    # works for files the caller made read-only.
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(name: str) -> str:
    return f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"


def _makedirs_durable(path: Path) -> None:
    """Create ``path`` and missing parents, fsyncing each new entry's parent so it survives a crash."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        # Another process winning the race leaves the folder we wanted anyway.
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        fsync_dir(d.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _atomic_write(path: Path, fill: Callable[[BinaryIO], None]) -> None:
    path = Path(path)
    _makedirs_durable(path.parent)
    while True:
        tmp = path.parent / _tmp_name(path.name)
        try:
            # os.open with 0o666 rather than mkstemp so the result gets umask permissions, not 0600.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers (and a crash) see either the old or the new content."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 variant of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_tree(root: Path) -> None:
    # Bottom-up so each folder is fsynced after the entries inside it exist on disk.
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                _fsync_file(p)
        fsync_dir(Path(dirpath))


def _umask_modes(root: Path) -> None:
    # safetensors (as other writers going through mkstemp) creates its files 0600 whatever the umask; give
    # every file the mode a plain open() would have, so a shared run folder stays readable as the user chose.
    mask = os.umask(0o022)
    os.umask(mask)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.chmod(p, 0o666 & ~mask)


@contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to ``final`` only once it is complete and durable.

    Yields a fresh hidden folder ``.tmp-<name>-<random>`` beside ``final``. If the body raises (including
    KeyboardInterrupt) the temporary folder is removed and ``final`` is untouched. If ``final`` already
    exists, ``replace=False`` raises FileExistsError (checked before the body runs and again before the
    rename); ``replace=True`` moves the old folder aside to ``.old-<name>-<random>``, renames the new one in,
    and only then deletes the old one.
    """
    final = Path(final)
    parent = final.parent
    if not replace and os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(final))
    _makedirs_durable(parent)
    tmp = parent / _tmp_name(final.name)
    tmp.mkdir()
    try:
        yield tmp
        _umask_modes(tmp)
        _fsync_tree(tmp)
        _move_into_place(tmp, final, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, final: Path, *, replace: bool) -> None:
    parent = final.parent
    if not os.path.lexists(final):
        # POSIX rename silently replaces an *empty* directory, so the existence check above is what enforces
        # replace=False; the race with another writer is accepted (one trainer owns a run folder).
        os.rename(tmp, final)
        fsync_dir(parent)
        return
    if not replace:
        raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(final))
    aside = parent / f"{OLD_PREFIX}{final.name}-{secrets.token_hex(4)}"
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    # The new folder must be durable under its final name before the only other copy disappears.
    fsync_dir(parent)
    try:
        _remove(aside)
        fsync_dir(parent)
    except OSError as e:
        # The new content is already in place; a leftover `.old-*` is tidied by CheckpointManager later.
        log.warning("could not remove %s: %s", aside, e)


def save_torch(obj: object, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically. Keep ``obj`` to tensors and plain containers so that
    :func:`load_torch` can read it back with ``weights_only=True``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


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
    """Checkpoints as folders ``root/step-<N>``, plus a ``root/latest`` pointer file naming the newest one.

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
            doomed = self.root / _tmp_name(ckpt.name)
            os.rename(ckpt, doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)
            excess -= 1

    def _tidy(self) -> None:
        self._recover_swaps()
        for entry in self.root.iterdir():
            finished_swap = entry.name.startswith(OLD_PREFIX) and self._old_target(entry).exists()
            if entry.name.startswith(TMP_PREFIX) or finished_swap:
                _remove(entry)
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

    def _pointer(self) -> Path | None:
        try:
            name = (self.root / POINTER_FILE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            # Missing or unreadable: the scan of step-* folders in latest() finds the newest one anyway.
            return None
        # Only ever a bare `step-N`: the pointer must not be able to send resume anywhere else on disk.
        return self.root / name if _STEP_RE.fullmatch(name) else None

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None.

        The pointer is trusted when it names a complete checkpoint, but a complete one with a higher step
        wins: the crash may have come after the folder rename and before the pointer update.
        """
        self._recover_swaps()
        complete = self.complete()
        if not complete:
            return None
        newest = complete[-1]
        pointed = self._pointer()
        if pointed is None or pointed not in complete:
            return newest
        return newest if _step_of(newest) > _step_of(pointed) else pointed
