"""`qalign report`: a run's curves in one PNG and a short summary per stage, both from metrics.jsonl.

Drawing needs matplotlib (the `report` extra); training never does, so a GPU box stays lean.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from qalign.atomic import atomic_write_bytes
from qalign.errors import UserError
from qalign.layout import STAGES, RunLayout
from qalign.metrics import read_records
from qalign.progress import format_duration

# (panel title, train metric, eval metric): drawn when the stage logged the train metric.
PANELS = (
    ("loss", "loss", "eval_loss"),
    ("learning rate", "lr", None),
    ("reward margin", "rewards/margin", "eval_rewards/margin"),
    ("reward accuracy", "rewards/accuracy", "eval_rewards/accuracy"),
)


@dataclass
class StageRun:
    name: str
    records: list[dict]
    """The logged steps, in order."""
    final: dict = field(default_factory=dict)
    """The record the runner writes when the stage finishes (empty while it runs or after an interruption)."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), int | float)]
        return [s for s, _ in points], [v for _, v in points]

    def panels(self) -> list[tuple[str, str, str | None]]:
        return [panel for panel in PANELS if self.series(panel[1])[0]]


def run_folder(target: Path, overrides: list[str] | None = None) -> Path:
    """The run folder of TARGET: a recipe (its output_dir, after --set overrides) or the folder itself."""
    if target.is_dir():
        return target
    if target.is_file():
        from qalign.recipe_load import load_recipe

        return load_recipe(target, overrides).out
    raise UserError(f"{target}: no such recipe or run folder")


def load_stages(out: Path) -> list[StageRun]:
    """Every stage of the run that logged at least one step."""
    layout = RunLayout(out)
    stages = []
    for name in STAGES:
        path = layout.stage(name).metrics
        if not path.is_file():
            continue
        records = read_records(path)
        steps = [r for r in records if "final" not in r and isinstance(r.get("step"), int)]
        final = next((r for r in reversed(records) if r.get("final")), {})
        if steps:
            stages.append(StageRun(name, steps, final))
    if not stages:
        raise UserError(
            f"{out}: holds no run (no logged steps in {' or '.join(f'{s}/metrics.jsonl' for s in STAGES)})"
        )
    return stages


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError('qalign report draws with matplotlib: pip install "qalign[report]"') from None


def draw(stages: list[StageRun], title: str) -> bytes:
    """One PNG: a row per stage, a panel per curve (train as a line, eval as dots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = max(len(stage.panels()) for stage in stages)
    figure = Figure(figsize=(4.2 * columns, 3.2 * len(stages)), layout="constrained")
    # Agg explicitly: no display is needed or touched, on a server or a laptop.
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(stages), columns, squeeze=False)
    for row, stage in zip(grid, stages, strict=True):
        panels = stage.panels()
        for axes, (label, train, evaluated) in zip(row, panels, strict=False):
            axes.plot(*stage.series(train), label="train")
            if evaluated and stage.series(evaluated)[0]:
                axes.plot(*stage.series(evaluated), "o-", label="eval")
                axes.legend()
            axes.set_title(f"{stage.name}: {label}")
            axes.set_xlabel("step")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.grid(alpha=0.3)
        for axes in row[len(panels) :]:
            axes.set_axis_off()
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def summary(stage: StageRun) -> str:
    """Two lines: what the stage cost, and what it reached."""
    final = stage.final
    parts = [f"{stage.records[-1]['step']} steps" + ("" if final else " (unfinished: no final record)")]
    if "tokens" in final:
        parts.append(f"{final['tokens']:,} tokens")
    seconds = final.get("train_seconds")
    if seconds is not None:
        rate = f", {final['tokens'] / seconds:,.0f} tok/s" if "tokens" in final and seconds > 0 else ""
        parts.append(f"{format_duration(seconds)}{rate}")
    if final.get("peak_memory_bytes"):
        parts.append(f"peak memory {final['peak_memory_bytes'] / 2**30:.2f} GiB")
    reached = []
    _, losses = stage.series("loss")
    if losses:
        reached.append(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (best {min(losses):.4f})")
    evals = [r for r in stage.records if "eval_loss" in r]
    if evals:
        keys = ("eval_loss", "eval_rewards/margin", "eval_rewards/accuracy")
        shown = ", ".join(f"{k.removeprefix('eval_')} {evals[-1][k]:.4f}" for k in keys if k in evals[-1])
        reached.append(f"final eval at step {evals[-1]['step']}: {shown}")
    return f"[bold]{stage.name}[/bold]: {escape(', '.join(parts))}\n  {escape('; '.join(reached))}"


def report(target: Path, out: Path | None, console: Console, overrides: list[str] | None = None) -> Path:
    """Draw TARGET's curves into `out` (default <output_dir>/report.png) and print the summary."""
    require_matplotlib()
    folder = run_folder(target, overrides)
    stages = load_stages(folder)
    out = out or RunLayout(folder).report
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the .png file to write")
    atomic_write_bytes(out, draw(stages, folder.name))
    for stage in stages:
        console.print(summary(stage))
    console.print(f"report written to {out}")
    return out
