from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qalign import atomic as ck
from qalign import checkpoint as checkpoint_module
from qalign.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from qalign.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_torch,
    restore_rng_state,
    save_torch,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _write_two(d: Path, tag: str) -> None:
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(tag.encode() * 100)
    (d / "notes.txt").write_text(tag)


def _manager(root: Path, keep: int = 2) -> tuple[CheckpointManager, list[str]]:
    warnings: list[str] = []
    return CheckpointManager(root, keep=keep, warn=warnings.append), warnings


def _save(mgr: CheckpointManager, step: int) -> Path:
    return mgr.save(step, lambda d: _write_two(d, f"s{step}"), {"loss": 1.0 / (step + 1)})


# atomic files


def test_atomic_write_replaces_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    atomic_write_text(target, "tschüss\n")
    assert target.read_text(encoding="utf-8") == "tschüss\n"
    assert os.listdir(target.parent) == ["out.bin"]


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    save_torch({"a": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_torch({"a": Unpicklable()}, target)
    assert torch.equal(load_torch(target)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_load_torch_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": Path("/etc/passwd")}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_torch(path)


# atomic folders


def test_atomic_dir_creates_folder_with_hidden_temp_name(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".tmp-out-")
        assert not final.exists()
        (tmp / "nested").mkdir()
        (tmp / "nested" / "f.txt").write_text("hi")
    assert (final / "nested" / "f.txt").read_text() == "hi"
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_body_failure_keeps_old_content(tmp_path: Path, exc: type[BaseException]) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "f.txt").write_text("old")
    with pytest.raises(exc), atomic_dir(final, replace=True) as tmp:
        (tmp / "f.txt").write_text("new")
        raise exc()
    assert (final / "f.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_replace(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_refuses_to_overwrite_without_replace(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError), atomic_dir(final):
        pass
    # An existing folder appearing while the body runs must also be caught, not silently merged.
    other = tmp_path / "other"
    with pytest.raises(FileExistsError), atomic_dir(other) as tmp:
        (tmp / "f.txt").write_text("x")
        other.mkdir()
    assert os.listdir(final) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["other", "out"]


# RNG state


def test_rng_round_trip_through_save_and_load(tmp_path: Path) -> None:
    # Leave half-used gaussian caches behind so they have to be captured too.
    random.seed(1)
    random.gauss(0, 1)
    np.random.seed(2)
    np.random.randn()
    torch.manual_seed(3)

    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    save_torch(state, path)
    expected = (
        [random.random(), random.gauss(0, 1)],
        [*np.random.rand(5).tolist(), np.random.randn()],
        torch.rand(5),
    )

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_torch(path))
    got = (
        [random.random(), random.gauss(0, 1)],
        [*np.random.rand(5).tolist(), np.random.randn()],
        torch.rand(5),
    )
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_round_trip(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(5)
    path = tmp_path / "rng.pt"
    save_torch(capture_rng_state(), path)
    expected = [torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(99)
    restore_rng_state(load_torch(path))
    got = [torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


# CheckpointManager


def test_save_writes_manifest_last_and_points_latest(tmp_path: Path) -> None:
    mgr, warnings = _manager(tmp_path / "ckpt")
    path = _save(mgr, 10)
    assert path == tmp_path / "ckpt" / "step-10"
    state = CheckpointManager.read_state(path)
    assert state["step"] == 10
    assert state["loss"] == pytest.approx(1 / 11)
    assert state["files"] == {"adapter/adapter_model.safetensors": 300, "notes.txt": 3}
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-10"
    assert mgr.latest() == path
    assert warnings == []


def test_save_rejects_conflicting_state(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path)
    with pytest.raises(ValueError):
        mgr.save(1, lambda d: None, {"step": 2})
    with pytest.raises(ValueError):
        mgr.save(1, lambda d: (d / "trainer_state.json").write_text("{}"), {})
    assert mgr.complete() == []
    assert os.listdir(tmp_path) == []


def test_keeps_only_last_k(tmp_path: Path) -> None:
    mgr, warnings = _manager(tmp_path, keep=2)
    for step in (5, 10, 15, 20):
        _save(mgr, step)
    assert [p.name for p in mgr.complete()] == ["step-15", "step-20"]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-15", "step-20"]
    assert warnings == []


def test_keep_zero_keeps_all(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path, keep=0)
    for step in range(4):
        _save(mgr, step)
    assert [p.name for p in mgr.complete()] == ["step-0", "step-1", "step-2", "step-3"]


def test_steps_sort_numerically(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path, keep=0)
    for step in (9, 10, 100):
        _save(mgr, step)
    assert [p.name for p in mgr.complete()] == ["step-9", "step-10", "step-100"]
    assert mgr.latest() == tmp_path / "step-100"


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json missing"),
        (lambda c: _truncate(c / "adapter" / "adapter_model.safetensors"), "is 199 bytes, expected 200"),
        (lambda c: (c / "notes.txt").unlink(), "notes.txt missing"),
        (lambda c: (c / "trainer_state.json").write_text('{"step": 3, "fil'), "unreadable"),
        (lambda c: (c / "trainer_state.json").write_text("[1, 2]"), "unreadable"),
        (lambda c: (c / "trainer_state.json").write_bytes(b"\xff\xfe\x00"), "unreadable"),
    ],
)
def test_torn_checkpoint_is_skipped_with_one_warning(tmp_path: Path, damage, reason: str) -> None:
    mgr, _ = _manager(tmp_path)
    _save(mgr, 2)
    newest = _save(mgr, 3)
    damage(newest)

    mgr, warnings = _manager(tmp_path)
    assert mgr.latest() == tmp_path / "step-2"
    assert mgr.latest() == tmp_path / "step-2"
    assert len(warnings) == 1
    assert warnings[0].startswith(f"skipping torn checkpoint {newest}: ")
    assert reason in warnings[0]
    assert newest.is_dir()  # left alone for a human to inspect


def test_manifest_cannot_point_outside(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path)
    path = _save(mgr, 1)
    (tmp_path / "secret").write_text("x")
    state = CheckpointManager.read_state(path)
    state["files"]["../secret"] = 1
    (path / "trainer_state.json").write_text(json.dumps(state))
    mgr, warnings = _manager(tmp_path)
    assert mgr.latest() is None
    assert "outside" in warnings[0]


def test_newer_complete_checkpoint_beats_pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr, _ = _manager(tmp_path)
    _save(mgr, 1)
    _save(mgr, 2)

    def crash(path: Path, text: str) -> None:
        raise KeyboardInterrupt  # the process dies after the rename, before the pointer update

    monkeypatch.setattr(checkpoint_module, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(mgr, 3)
    monkeypatch.undo()

    assert (tmp_path / "latest").read_text().strip() == "step-2"
    mgr, warnings = _manager(tmp_path)
    assert mgr.latest() == tmp_path / "step-3"
    assert warnings == []


def test_stale_or_bogus_pointer(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path, keep=0)
    _save(mgr, 1)
    _save(mgr, 2)
    ck.remove_path(tmp_path / "step-2")
    mgr, warnings = _manager(tmp_path)
    assert mgr.latest() == tmp_path / "step-1"

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "latest").write_text("../elsewhere\n")
    assert mgr.latest() == tmp_path / "step-1"
    (tmp_path / "latest").unlink()
    assert mgr.latest() == tmp_path / "step-1"
    assert warnings == []


def test_no_checkpoints(tmp_path: Path) -> None:
    mgr, warnings = _manager(tmp_path / "missing")
    assert mgr.latest() is None
    assert mgr.complete() == []
    assert warnings == []


def test_stale_temp_leftovers_are_cleaned_on_next_save(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path)
    _save(mgr, 1)
    (tmp_path / ".tmp-step-2-deadbeef").mkdir()
    (tmp_path / ".tmp-step-2-deadbeef" / "adapter.bin").write_bytes(b"partial")
    (tmp_path / ".tmp-latest-cafef00d").write_text("step-")
    (tmp_path / ".old-step-1-0badf00d").mkdir()  # swap finished, old copy not yet deleted

    mgr, warnings = _manager(tmp_path)
    assert mgr.latest() == tmp_path / "step-1"
    assert warnings == []
    _save(mgr, 2)
    assert _hidden(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-1", "step-2"]


def test_interrupted_replace_is_recovered(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path, keep=1)
    _save(mgr, 7)
    # What a crash between the two renames of atomic_dir(replace=True) leaves behind: the only complete
    # copy of step-7 sits under its aside name and the finished replacement under its temp name.
    os.rename(tmp_path / "step-7", tmp_path / ".old-step-7-12345678")
    (tmp_path / ".tmp-step-7-87654321").mkdir()

    mgr, warnings = _manager(tmp_path, keep=1)
    before = sorted(os.listdir(tmp_path))
    assert mgr.latest() is None  # a reader changes nothing on disk, even to recover
    assert sorted(os.listdir(tmp_path)) == before
    mgr.recover()
    assert mgr.latest() == tmp_path / "step-7"
    assert (tmp_path / "step-7" / "notes.txt").read_text() == "s7"
    assert warnings == []


def test_resaving_same_step_replaces_it(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path, keep=1)
    _save(mgr, 4)
    mgr.save(4, lambda d: (d / "notes.txt").write_text("again"), {})
    assert mgr.latest() == tmp_path / "step-4"
    assert sorted(os.listdir(tmp_path / "step-4")) == ["notes.txt", "trainer_state.json"]
    assert (tmp_path / "step-4" / "notes.txt").read_text() == "again"
    assert _hidden(tmp_path) == []


# SIGKILL at random moments

_PAYLOAD = 1_500_000  # bytes of adapter per checkpoint; with the optimizer tensor ~2.5 MB per save

_CHILD = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    import torch
    from qalign.checkpoint import CheckpointManager, save_torch

    root = Path(sys.argv[1])
    mgr = CheckpointManager(root, keep=2)
    mgr.recover()
    last = mgr.latest()
    step = CheckpointManager.read_state(last)["step"] + 1 if last else 1
    print("ready", flush=True)

    def write(d):
        (d / "adapter").mkdir()
        (d / "adapter" / "adapter_model.safetensors").write_bytes(random.Random(step).randbytes(PAYLOAD))
        save_torch({"w": torch.arange(250_000, dtype=torch.float32) + step}, d / "optimizer.pt")

    while True:
        mgr.save(step, write, {"loss": 1.0 / step})
        step += 1
    """
).replace("PAYLOAD", str(_PAYLOAD))


def _check_checkpoint(path: Path) -> int:
    state = CheckpointManager.read_state(path)
    step = state["step"]
    assert path.name == f"step-{step}"
    assert state["loss"] == pytest.approx(1.0 / step)
    assert set(state["files"]) == {"adapter/adapter_model.safetensors", "optimizer.pt"}
    adapter = (path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert adapter == random.Random(step).randbytes(_PAYLOAD)
    opt = load_torch(path / "optimizer.pt")
    assert torch.equal(opt["w"], torch.arange(250_000, dtype=torch.float32) + step)
    return step


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_sigkill_at_random_moments_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    delays = random.Random(20240601)
    previous = 0
    for kill in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            assert line == "ready\n", proc.stderr.read()
            if kill == 0:
                deadline = time.monotonic() + 10
                while not (root / "latest").exists():
                    assert proc.poll() is None, proc.stderr.read()
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
            time.sleep(delays.uniform(0.02, 0.3))
            assert proc.poll() is None, proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

        mgr, warnings = _manager(root)
        mgr.recover()
        latest = mgr.latest()
        assert latest is not None
        step = _check_checkpoint(latest)
        assert step >= previous, "resume went backwards"
        assert warnings == []  # atomic saves never expose a torn step-N
        # One more than `keep` if the kill came between the rename and the pruning.
        assert 1 <= len(mgr.complete()) <= 3
        for path in mgr.complete():
            _check_checkpoint(path)
        previous = step
    assert previous >= 2
