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
from qalign.cli_help import PlainGroup, PlainTyper
from qalign.cli_options import ForceResume, NoResume, Nproc, Overwrite, RecipeArg, SetOpt, process_count
from qalign.errors import UserError

app = PlainTyper(
    cls=PlainGroup,
    help="QLoRA fine-tuning (SFT, then DPO) of a 4-bit base model, driven by one YAML recipe.",
    # Bare `qalign` prints the help and exits 0 (see _root); typer's no_args_is_help exits 2.
    no_args_is_help=False,
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
def _user_errors(on_interrupt: str = "the last complete checkpoint is kept") -> Iterator[None]:
    from qalign.errors import TrainingStopped

    try:
        yield
    except UserError as exc:
        _report("error", str(exc), 2)
        raise typer.Exit(2) from None
    except TrainingStopped as exc:
        _report("stopped", str(exc), exc.code)
        raise typer.Exit(exc.code) from None
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted[/bold red]: {on_interrupt}")
        raise typer.Exit(130) from None


def _report(kind: str, message: str, code: int) -> None:
    """One line for the user. A worker of `--nproc` leaves it to the launcher, which prints the first failing
    rank's; under a user's own torchrun each rank prints, the others' lines naming their rank."""
    from qalign.distributed import ERRORS_ENV, record_failure, world_from_env

    world = world_from_env()
    if world.many and os.environ.get(ERRORS_ENV):
        record_failure(world, message, code)
        return
    where = "" if world.main else f" (rank {world.rank})"
    err_console.print(f"[bold red]{kind}{where}:[/bold red] {escape(message)}", soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"qalign {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """qalign: align a small LLM on one consumer GPU, or on a CPU."""
    if ctx.invoked_subcommand is None:
        # Asking for nothing is not an error: show what there is to ask for.
        typer.echo(ctx.get_help(), nl=False)
        raise typer.Exit(0)


@app.command()
def init(
    model: Annotated[
        str, typer.Option("--model", metavar="ID", help="Base model: a hub id or a local folder.")
    ] = "Qwen/Qwen2.5-0.5B-Instruct",  # starter.DEFAULT_MODEL, spelled out so --help needs no import
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="Where to write the recipe.")] = Path(
        "recipe.yaml"
    ),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the file if it exists.")] = False,
) -> None:
    """Write a starter recipe (sft, then dpo): every key with its type, default and meaning."""
    from qalign.starter import DPO_DATA, SFT_DATA, model_for_recipe, starter_recipe

    with _user_errors("nothing was written"):
        if out.is_dir():
            raise UserError(f"{out} is a folder; --out names the recipe file to write")
        if out.exists() and not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it")
        from qalign.atomic import atomic_write_text

        try:
            atomic_write_text(out, starter_recipe(model_for_recipe(model, out)))
        except OSError as exc:
            raise UserError(f"{out}: cannot write the recipe ({exc.strerror or exc})") from None
        folder = out.parent
        console.print(
            f"wrote {escape(str(out))}: put chat data at {escape(str(folder / SFT_DATA))} and preference pairs at "
            f"{escape(str(folder / DPO_DATA))} (or edit sft.data.train and dpo.data.train), then run "
            f"qalign validate {escape(str(out))}"
        )


STAGES = ("sft", "dpo")


def _train(
    recipe: Path,
    overrides: list[str] | None,
    stages: tuple[str, ...],
    resume: bool,
    overwrite: bool,
    force_resume: bool,
    nproc: str = "auto",
) -> None:
    from qalign.distributed import check_launcher, world_from_env
    from qalign.progress import Progress
    from qalign.recipe_load import load_recipe

    world = world_from_env()
    with _user_errors():
        loaded = load_recipe(recipe, overrides)
        check_launcher(loaded.distributed.strategy)
        present = [name for name in stages if getattr(loaded, name) is not None]
        if not present:
            raise UserError(
                f"{loaded.source}: the recipe has no {' or '.join(repr(s) for s in stages)} section"
            )
        count = 1 if world.many else process_count(nproc)
        if count > 1:
            from qalign.distributed import launch

            # The recipe is checked here first, so a bad one is one error before any worker starts.
            command = stages[0] if len(stages) == 1 else "run"
            argv = [command, str(recipe), *(f"--set={item}" for item in overrides or [])]
            argv += [
                flag
                for flag, on in (
                    ("--no-resume", not resume),
                    ("--overwrite", overwrite),
                    ("--force-resume", force_resume),
                )
                if on
            ]
            code, message = launch(count, argv)
            if message is not None:
                kind = "error" if code == 2 else "stopped"
                err_console.print(f"[bold red]{kind}:[/bold red] {escape(message)}", soft_wrap=True)
            raise typer.Exit(code)
        _quiet_libraries()
        from qalign.runner import RunOptions, run_stages

        if "export" in present:
            from qalign.gguf_export import check_exportable

            check_exportable(loaded.model.base, Progress(console, err_console))

        # `qalign run` owns every stage: a DPO stage trained from an older SFT adapter is trained again.
        options = RunOptions(resume, overwrite, force_resume, redo_on_new_start=len(stages) > 1)
        progress = Progress(console, err_console) if world.main else Progress.silent()
        run_stages(loaded, present, progress, options, world)


@app.command()
def sft(
    recipe: RecipeArg,
    set_: SetOpt = None,
    no_resume: NoResume = False,
    overwrite: Overwrite = False,
    force_resume: ForceResume = False,
    nproc: Nproc = "auto",
) -> None:
    """Supervised fine-tuning: LoRA on the 4-bit base, loss on assistant tokens only."""
    _train(recipe, set_, ("sft",), not no_resume, overwrite, force_resume, nproc)


@app.command()
def dpo(
    recipe: RecipeArg,
    set_: SetOpt = None,
    no_resume: NoResume = False,
    overwrite: Overwrite = False,
    force_resume: ForceResume = False,
    nproc: Nproc = "auto",
) -> None:
    """Direct Preference Optimization, starting from (and referenced to) the SFT adapter when there is one."""
    _train(recipe, set_, ("dpo",), not no_resume, overwrite, force_resume, nproc)


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    no_resume: NoResume = False,
    overwrite: Overwrite = False,
    force_resume: ForceResume = False,
    nproc: Nproc = "auto",
) -> None:
    """Every stage the recipe has, in order (sft, dpo, merge, then export), resuming whatever is already done."""
    _train(recipe, set_, (*STAGES, "merge", "export"), not no_resume, overwrite, force_resume, nproc)


@app.command()
def merge(
    recipe: Annotated[
        Path | None,
        typer.Argument(metavar="RECIPE", help="The recipe whose adapter to merge.", show_default=False),
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", metavar="sft|dpo", help="Default: the last stage with an adapter."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", metavar="DIR", help="Output folder; default <output_dir>/merged.")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option("--base", metavar="MODEL", help="Without a recipe: the base model (hub id or folder)."),
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", metavar="DIR", help="Without a recipe: the adapter folder.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", metavar="bf16|fp16|fp32", help="Default: merge.dtype, else bf16.")
    ] = None,
    base_weights: Annotated[
        str | None,
        typer.Option(
            "--base-weights",
            metavar="nf4-roundtrip|original",
            help="Default: merge.base_weights, else nf4-roundtrip.",
        ),
    ] = None,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the output folder if it exists (the old one stays until the new export is complete).",
        ),
    ] = False,
) -> None:
    """Fold the adapter into 16-bit weights: a standalone model that plain transformers loads."""
    from qalign.progress import Progress
    from qalign.recipe_load import load_recipe

    with _user_errors("nothing was exported; an earlier export is untouched"):
        if dtype not in (None, "bf16", "fp16", "fp32"):
            raise UserError(f"--dtype {dtype}: expected bf16, fp16 or fp32")
        if base_weights not in (None, "nf4-roundtrip", "original"):
            raise UserError(f"--base-weights {base_weights}: expected nf4-roundtrip or original")
        if stage not in (None, *STAGES):
            raise UserError(f"--stage {stage}: expected one of {', '.join(STAGES)}")
        progress = Progress(console, err_console)
        if recipe is not None:
            if base is not None or adapter is not None:
                raise UserError("give either a recipe or --base/--adapter/--out, not both")
            loaded = load_recipe(recipe, set_)
            _quiet_libraries()
            from qalign.merge import run_merge

            run_merge(loaded, progress, stage, out, dtype, base_weights, overwrite)
            return
        if adapter is None or out is None:
            raise UserError("qalign merge needs a recipe, or --adapter DIR --out DIR (and --base MODEL)")
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"--adapter {adapter}: not an adapter folder (no adapter_config.json)")
        _quiet_libraries()
        from qalign.adapter import TrainedAs
        from qalign.merge import merge as merge_adapter

        trained = TrainedAs.from_adapter(adapter, base)
        merge_adapter(
            trained, adapter, out, dtype or "bf16", base_weights or "nf4-roundtrip", [], progress, overwrite
        )


@app.command()
def export(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE",
            help="A recipe (exports its merged model), a merged model folder or a transformers model folder.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", metavar="FILE.gguf", help="The GGUF file to write.")],
    quant: Annotated[
        str,
        typer.Option("--quant", metavar="f32|f16|bf16|q8_0|q4_k_m", help="Weight type of the GGUF file."),
    ] = "q8_0",
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace FILE.gguf (and its Modelfile) if it exists.")
    ] = False,
) -> None:
    """Write a GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it."""
    from qalign.progress import Progress

    with _user_errors("nothing was exported; an earlier file is untouched"):
        model_dir = _export_source(source, set_)
        _quiet_libraries()
        from qalign.gguf_export import export_gguf, how_to_run, modelfile_path

        export_gguf(model_dir, out, quant, Progress(console, err_console), overwrite)
        console.print(f"wrote {out} ({quant}, from {model_dir}) and {modelfile_path(out)}")
        console.print(how_to_run(out))


def _export_source(source: Path, overrides: list[str] | None) -> Path:
    """The model folder behind `qalign export SOURCE`: a recipe's merged model, or SOURCE itself."""
    if source.is_dir():
        if overrides:
            raise UserError(f"--set changes recipe keys; {source} is a model folder, not a recipe")
        return source
    if not source.is_file():
        raise UserError(f"{source}: no such recipe or model folder")
    from qalign.gguf_export import merged_model
    from qalign.recipe_load import load_recipe

    return merged_model(load_recipe(source, overrides))


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", metavar="sft|dpo", help="Check only this stage; default every stage."),
    ] = None,
    dump: Annotated[
        Path | None,
        typer.Option(
            "--dump",
            metavar="FILE.jsonl",
            help="Write each tokenized row to this .jsonl file: {input_ids, labels} for sft, "
            "{prompt_ids, chosen_ids, rejected_ids} for dpo ({prompt_ids, completion_ids, label, "
            "kl_completion_ids} for loss: kto) (of --stage, default the first stage).",
        ),
    ] = None,
) -> None:
    """Check the recipe and every data row without training; print dataset statistics."""
    from qalign.progress import Progress
    from qalign.recipe_load import load_recipe

    with _user_errors("nothing was changed"):
        loaded = load_recipe(recipe, set_)
        console.print(f"recipe {loaded.source}: ok")
        if stage is not None and stage not in STAGES:
            raise UserError(f"--stage {stage}: expected one of {', '.join(STAGES)}")
        present = [name for name in STAGES if getattr(loaded, name) is not None and stage in (None, name)]
        if not present:
            raise UserError(f"{loaded.source}: no {stage or 'sft or dpo'} section to check")
        _quiet_libraries()
        from qalign.model import load_tokenizer
        from qalign.packing import packing_line
        from qalign.preview import show_example, write_dump
        from qalign.stage_data import load_stage_data

        progress = Progress(console, err_console)
        tokenizer = load_tokenizer(loaded.model, progress.warn)
        for index, name in enumerate(present):
            console.rule(f"[bold]{name}")
            if name == "dpo":
                from qalign.reference_free import describe_objective

                console.print(escape(describe_objective(loaded.dpo)))
            data = load_stage_data(loaded, name, tokenizer, progress)
            train, evals = data.train, data.eval
            show_example(console, tokenizer, train[0])
            console.print(packing_line(loaded, name, train))
            if dump is not None and index == 0:
                write_dump(dump, [*train, *(evals or [])])
                console.print(f"wrote {len(train) + len(evals or [])} tokenized {name} rows to {dump}")
        console.print("[green]data ok[/green]")


@app.command()
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    stage: Annotated[
        str | None, typer.Option("--stage", metavar="sft|dpo", help="Default: the recipe's first stage.")
    ] = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            "--gpu-memory",
            metavar="SIZE",
            help="Memory to fit in, e.g. 8GiB, 8GB (read as GiB), 8000MiB or bytes.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout (messages go to stderr).")
    ] = False,
    nproc: Annotated[
        str,
        typer.Option(
            "--nproc",
            metavar="N|auto",
            help="Plan each of N processes (ddp and fsdp); auto: one per visible CUDA device.",
        ),
    ] = "auto",
) -> None:
    """Predict the peak memory of a training stage from the model's config and the data's lengths."""
    import json

    from qalign.memory_auto import parse_size, plan_recipe
    from qalign.progress import Progress
    from qalign.recipe_load import load_recipe

    with _user_errors("nothing was changed"):
        limit = parse_size(gpu_memory) if gpu_memory is not None else None
        loaded = load_recipe(recipe, set_)
        if stage is not None and stage not in STAGES:
            raise UserError(f"--stage {stage}: expected one of {', '.join(STAGES)}")
        present = [name for name in STAGES if getattr(loaded, name) is not None and stage in (None, name)]
        if not present:
            raise UserError(f"{loaded.source}: no {stage or 'sft or dpo'} section to plan")
        _quiet_libraries()
        # With --json, stdout carries the object alone: the data report goes to stderr.
        progress = Progress(err_console if as_json else console, err_console)
        from qalign.stage_data import planned_lengths

        processes = process_count(nproc)
        lengths = planned_lengths(loaded, present[0], progress)
        result, decided = plan_recipe(loaded, present[0], limit, lengths)
        if processes > 1:
            from qalign.memory_parallel import per_process_plans

            plans = per_process_plans(loaded, result, processes)
            result = plans[loaded.distributed.strategy]
        if as_json:
            payload = result.to_json()
            if processes > 1:
                payload["processes"] = processes
                payload["strategy"] = loaded.distributed.strategy
                payload["per_process_total_bytes"] = {s: p.total_bytes for s, p in plans.items()}
            sys.stdout.write(json.dumps(payload) + "\n")
            return
        from qalign.plan_table import show_plan

        show_plan(console, result, decided)
        if processes > 1:
            console.print(
                f"each of {processes} processes: "
                + ", ".join(f"{s} {p.total_bytes / 2**30:.2f} GiB" for s, p in plans.items())
                + f" (the recipe's distributed.strategy: {loaded.distributed.strategy})"
            )


@app.command("chat")
def chat_command(
    target: Annotated[
        Path,
        typer.Argument(
            metavar="TARGET",
            help="A recipe (.yaml), a merged model folder or an adapter folder.",
            show_default=False,
        ),
    ],
    stage: Annotated[
        str | None,
        typer.Option(
            "--stage",
            metavar="sft|dpo|base",
            help="With a recipe: the stage; default the last trained stage.",
        ),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", metavar="TEXT", help="Answer this once and exit (for scripts).")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", metavar="T", help="0 = greedy.")] = 0.7,
    top_p: Annotated[
        float,
        typer.Option(
            "--top-p",
            metavar="P",
            help="Nucleus sampling: keep the most likely tokens up to this probability.",
        ),
    ] = 0.9,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", metavar="N", help="Longest reply, in tokens.")
    ] = 256,
    seed: Annotated[int | None, typer.Option("--seed", metavar="N", help="Same seed, same answer.")] = None,
    system: Annotated[
        str | None,
        typer.Option(
            "--system", metavar="TEXT", help="A system turn the conversation starts with (kept by /reset)."
        ),
    ] = None,
    tools: Annotated[
        Path | None,
        typer.Option(
            "--tools",
            metavar="FILE",
            help="A JSON file with a list of function definitions, given to the chat template as training "
            'rows give their "tools".',
        ),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Talk to a model from the terminal: streams tokens, keeps the history; /reset and /exit."""
    with _user_errors("bye"):
        if stage not in (None, "base", *STAGES):
            raise UserError(f"--stage {stage}: expected sft, dpo or base")
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
        _quiet_libraries()
        from qalign.chat import chat, read_tools

        def warn(message: str) -> None:
            err_console.print(f"[yellow]warning:[/yellow] {escape(message)}")

        chat(
            target,
            stage,
            prompt,
            temperature,
            top_p,
            max_new_tokens,
            seed,
            console,
            set_,
            warn=warn,
            system=system,
            tools=read_tools(tools) if tools is not None else None,
        )


@app.command("report")
def report_command(
    target: Annotated[
        Path,
        typer.Argument(metavar="TARGET", help="A recipe (.yaml) or a run folder.", show_default=False),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", metavar="FILE.png", help="Where to draw the curves; default <output_dir>/report.png."
        ),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Draw a run's loss, eval loss, learning rate (and DPO reward margin and accuracy) into a PNG; summarize."""
    from qalign.report import report

    with _user_errors("nothing was written"):
        report(target, out, console, set_)


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `qalign validate ... | head`
        sys.stderr.close()


if __name__ == "__main__":  # pragma: no cover
    main()
