"""Written folders get the permissions the umask asks for, whatever library wrote each file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qalign.atomic import atomic_dir, atomic_write_text


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_dir_files_follow_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "adapter") as folder:
            save_file({"w": torch.zeros(2)}, folder / "adapter_model.safetensors")  # 0600 on its own
            (folder / "sub").mkdir()
            torch.save({"step": 1}, folder / "sub" / "optimizer.pt")
            atomic_write_text(folder / "qalign.json", "{}\n")
    finally:
        os.umask(old)
    found = modes(tmp_path / "adapter")
    assert len(found) == 3 and set(found.values()) == {expected}, {k: oct(v) for k, v in found.items()}
