"""`make demo`'s two steps on the shipped recipe, into a temporary folder: the models really change."""

from __future__ import annotations

import sys
from pathlib import Path

from test_cli_sft import qalign

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_demo_trains_and_the_table_shows_both_stages_working(tmp_path):
    out = f"output_dir={tmp_path / 'demo'}"
    # The two training stages only: merging is tested elsewhere, and this test must finish on a busy machine.
    for stage in ("sft", "dpo"):
        result = qalign(stage, str(ROOT / "recipes" / "demo.yaml"), "--set", out, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    from demo_report import main

    rates = main(str(ROOT / "recipes" / "demo.yaml"), [out])
    base, sft, dpo = rates["base"], rates["after SFT"], rates["after DPO"]
    assert base["format"] < 0.1 and sft["format"] >= 0.9  # SFT taught the answer format
    assert sft["hedged"] >= 0.5 and dpo["hedged"] <= 0.1  # DPO taught the preference
    assert dpo["preferred"] > sft["preferred"] + 0.3
