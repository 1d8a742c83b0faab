"""Crash-safe writing of files and folders.

Every write here goes to a temporary name in the destination folder, is fsynced, and is then renamed into
place, so a crash, Ctrl-C or SIGKILL at any moment leaves either the old content or the new content, never a
mix. Renames are only atomic within one filesystem, which is why temporaries always live beside their target.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# Folders moved aside while atomic_dir(replace=True) swaps in a new one. They get their own prefix because,
# unlike `.tmp-*` leftovers, one of them may be the only copy of a checkpoint if the crash came between the
# two renames, so CheckpointManager must put it back rather than delete it.
OLD_PREFIX = ".old-"


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


def tmp_name(name: str) -> str:
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


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def atomic_write_with(path: Path, fill: Callable[[BinaryIO], None]) -> None:
    path = Path(path)
    _makedirs_durable(path.parent)
    while True:
        tmp = path.parent / tmp_name(path.name)
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
    atomic_write_with(path, lambda f: f.write(data))


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


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (set-and-restore would briefly give
    other threads' new files the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_modes(root: Path) -> None:
    # safetensors (as other writers going through mkstemp) creates its files 0600 whatever the umask; give
    # every file the mode a plain open() would have, so a shared run folder stays readable as the user chose.
    mode = 0o666 & ~current_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.chmod(p, mode)


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
    tmp = parent / tmp_name(final.name)
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
        remove_path(aside)
        fsync_dir(parent)
    except OSError as e:
        # The new content is already in place; a leftover `.old-*` is tidied by CheckpointManager later.
        log.warning("could not remove %s: %s", aside, e)
