"""The `qalign` command line. User errors print one line and exit 2; no traceback."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from qalign import __version__
from qalign.errors import UserError

app = typer.Typer(
    help="QLoRA fine-tuning (SFT, then DPO) of a 4-bit base model, driven by one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: long lines (paths, statistics) stay whole in logs instead of breaking at 80 columns.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
# Set before torch/peft import bitsandbytes, which logs a notice about optional CPU kernels on import.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Deprecation notices inside transformers/peft are for their maintainers, not for someone training a model.
warnings.filterwarnings("ignore", category=FutureWarning)

RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe key, e.g. --set sft.lr=1e-4 (repeatable).", show_default=False
    ),
]


def _quiet_libraries() -> None:
    # Library chatter (weight-loading bars, optional-kernel notices) buries the lines that matter to the user.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


@contextmanager
def _user_errors() -> Iterator[None]:
    from qalign.train import TrainingStopped

    try:
        yield
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except TrainingStopped as exc:
        err_console.print(f"[bold red]stopped:[/bold red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.code) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/bold red]: the last complete checkpoint is kept")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"qalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """qalign: align a small LLM on one consumer GPU, or on a CPU."""


@app.command()
def sft(
    recipe: RecipeArg,
    set_: SetOpt = None,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Start over instead of resuming from the last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Allow replacing a finished adapter.")
    ] = False,
) -> None:
    """Supervised fine-tuning: LoRA on the 4-bit base, loss on assistant tokens only."""
    from qalign.progress import Progress
    from qalign.recipe import load_recipe

    with _user_errors():
        loaded = load_recipe(recipe, set_)
        _quiet_libraries()
        from qalign.runner import run_sft

        run_sft(loaded, Progress(console, err_console), resume=not no_resume, overwrite=overwrite)


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    dump: Annotated[
        Path | None,
        typer.Option("--dump", help="Write each tokenized row as {input_ids, labels} to this .jsonl file."),
    ] = None,
) -> None:
    """Check the recipe and every data row without training; print dataset statistics."""
    from qalign.progress import Progress
    from qalign.recipe import load_recipe

    with _user_errors():
        loaded = load_recipe(recipe, set_)
        console.print(f"recipe {loaded.source}: ok")
        if loaded.sft is None:
            console.print("no stage with data to check")
            return
        _quiet_libraries()
        from qalign.model import load_tokenizer
        from qalign.preview import show_example, write_dump
        from qalign.runner import load_sft_data

        progress = Progress(console, err_console)
        tokenizer = load_tokenizer(loaded.model, progress.warn)
        train, evals, _ = load_sft_data(loaded, tokenizer, progress)
        show_example(console, tokenizer, train[0])
        if dump is not None:
            write_dump(dump, [*train, *(evals or [])])
            console.print(f"wrote {len(train) + len(evals or [])} tokenized rows to {dump}")
        console.print("[green]data ok[/green]")


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `qalign validate ... | head`
        sys.stderr.close()


if __name__ == "__main__":  # pragma: no cover
    main()
