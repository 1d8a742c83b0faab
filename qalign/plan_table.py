"""`qalign plan`'s printed form of a memory plan."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def show_plan(console: Console, result: object, decided: list[str]) -> None:
    """`qalign plan`'s table: each component, the total, what was decided and whether it fits."""
    from rich.table import Table

    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    table = Table(title=f"qalign plan: {result.stage} on {result.target}")
    table.add_column("component")
    table.add_column("bytes", justify="right")
    for name, value in result.components.items():
        table.add_row(name, size(value))
        if name == "base_weights":
            for part, part_value in result.base_detail.items():
                table.add_row(f"  {part}", f"[dim]{size(part_value)}[/dim]")
    table.add_row("[bold]total[/bold]", f"[bold]{size(result.total_bytes)}[/bold]")
    console.print(table)
    ckpt = result.activations_by_checkpointing
    console.print(
        f"activations + logits: {size(ckpt['on'])} with gradient checkpointing, {size(ckpt['off'])} without "
        f"({'on' if result.gradient_checkpointing else 'off'} in this plan)"
        + (
            f"; activation offloading on: {size(result.host_offload_bytes)} in host memory"
            if result.activation_offloading
            else ""
        )
    )
    for line in [*decided, *result.assumptions]:
        console.print(f"[dim]{escape(line)}[/dim]")
    # Without --gpu-memory the plan is checked against what this machine has free, as a run's `auto` is.
    where = " of available RAM" if result.target == "cpu" else ""
    if result.fits is None:
        console.print("no memory size given (--gpu-memory 8GiB): not checked against one")
    elif result.fits:
        console.print(
            f"[green]fits[/green] in {size(result.limit)}{where} "
            f"({size(result.limit - result.total_bytes)} left)"
        )
    else:
        console.print(f"[red]does not fit[/red] in {size(result.limit)}{where}")
        if result.suggestions:
            overrides = " ".join(f"--set {item}" for item in result.suggestions)
            note = f" ({result.suggestion_note})" if result.suggestion_note else ""
            console.print(f"smallest change that fits{escape(note)}: {escape(overrides)}")
        else:
            console.print(escape(result.suggestion_note))
