"""The options the qalign commands share (the recipe, --set, resuming, --nproc), declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qalign.errors import UserError

RecipeArg = Annotated[
    Path, typer.Argument(metavar="RECIPE", help="The recipe YAML file.", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a recipe key, e.g. --set sft.lr=1e-4 (repeatable).",
        show_default=False,
    ),
]


NoResume = Annotated[
    bool, typer.Option("--no-resume", help="Start over instead of resuming from the last checkpoint.")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Allow replacing a finished adapter.")]
ForceResume = Annotated[
    bool,
    typer.Option(
        "--force-resume", help="Resume even though the recipe or data changed since the checkpoint."
    ),
]
Nproc = Annotated[
    str,
    typer.Option(
        "--nproc",
        metavar="N|auto",
        help="Worker processes, started through torch.distributed.run (NCCL on GPUs, gloo on a CPU); auto: one "
        "per visible CUDA device, 1 without CUDA.",
    ),
]


def process_count(value: str) -> int:
    if value == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--nproc: expected a number of processes (1 or more) or 'auto', got '{value}'")
    return int(value)
