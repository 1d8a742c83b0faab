"""`qalign chat`: talk to any stage of a run (or a merged model, or an adapter) from the terminal."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from qalign.errors import UserError, first_line

if TYPE_CHECKING:
    from qalign.recipe import ModelSpec


def load_target(target: Path, stage: str | None, overrides: list[str] | None, warn: Callable[[str], None]):
    """(model, tokenizer, description) for a recipe (+ stage), a merged model folder or an adapter folder."""
    from transformers import AutoModelForCausalLM

    from qalign.layout import find_adapter
    from qalign.model import compute_dtype, load_base, load_tokenizer, pick_device
    from qalign.recipe import ModelSpec
    from qalign.recipe_load import load_recipe

    device = pick_device()
    if not target.exists():
        raise UserError(f"{target}: no such file or folder")
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        recipe = load_recipe(target, overrides)
        if stage == "base":
            return (
                load_base(recipe.model, device),
                load_tokenizer(recipe.model, warn),
                f"{recipe.model.base} (base)",
            )
        adapter = find_adapter(recipe, stage, "train first (qalign run), or use --stage base")
        return (
            _with_adapter(load_base(recipe.model, device), adapter),
            _tokenizer(adapter, warn, recipe.model),
            str(adapter),
        )
    if stage is not None:
        raise UserError(
            f"--stage {stage}: only a recipe has stages; {target} is one model, so leave --stage out"
        )
    if (target / "adapter_config.json").is_file():
        from qalign.adapter import TrainedAs

        trained = TrainedAs.from_adapter(target)
        # Without qalign.json the dtype training used is unknown: let the device pick.
        known = (target / "qalign.json").exists()
        spec = ModelSpec(
            base=trained.base,
            revision=trained.revision,
            quantization=trained.quantization,
            double_quant=trained.double_quant,
            compute_dtype=trained.compute_dtype if known else "auto",
            trust_remote_code=trained.trust_remote_code,
        )
        try:
            base = load_base(spec, device)
        except UserError as exc:  # its message names model.base, a recipe key this user never wrote
            raise UserError(f"{target} (adapter): {str(exc).removeprefix('model.base: ')}") from None
        return _with_adapter(base, target), _tokenizer(target, warn, spec), str(target)
    if (target / "config.json").is_file():
        try:
            dtype = compute_dtype("auto", device)
            model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, use_safetensors=True).to(device)
        except Exception as exc:  # corrupt weights raise SafetensorError, unknown architectures KeyError...
            raise UserError(f"{target}: cannot load the model: {first_line(exc)}") from None
        return model, _tokenizer(target, warn), str(target)
    raise UserError(
        f"{target}: not a recipe (.yaml), a model folder (config.json) or an adapter (adapter_config.json)"
    )


def _with_adapter(base: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter))
    except Exception as exc:  # an adapter for another base fails with a RuntimeError (size mismatch)
        raise UserError(f"{adapter}: cannot load the adapter: {first_line(exc)}") from None


def _tokenizer(folder: Path, warn: Callable[[str], None], base: ModelSpec | None = None):
    """The tokenizer saved beside the weights: it carries the chat template used in training."""
    from transformers import AutoTokenizer

    from qalign.chat_template import CHATML_TEMPLATE
    from qalign.model import load_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        if base is None:
            raise UserError(f"{folder}: cannot load the tokenizer: {first_line(exc)}") from None
        warn(f"{folder} holds no tokenizer; using the base's, whose chat template may differ from training")
        return load_tokenizer(base, warn)
    if not tokenizer.chat_template:
        warn(f"{folder} has no chat template; using ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


class _Cancelled:
    """Ends generation once `event` is set: the worker thread cannot be interrupted any other way."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


class ChatSession:
    """A conversation with a model: the history, and streamed replies rendered through its chat template."""

    def __init__(self, model: torch.nn.Module, tokenizer, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int | None, system: str | None = None, tools: list[dict] | None = None) -> None:  # fmt: skip
        from qalign.chat_template import end_of_turn_ids

        self.model, self.tokenizer = model.eval(), tokenizer
        self.temperature, self.top_p, self.max_new_tokens, self.seed = (
            temperature,
            top_p,
            max_new_tokens,
            seed,
        )
        # Training data usually has a system turn; the conversation starts with it, and /reset keeps it.
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = list(self.system)
        # Function definitions, given to the template as training rows give theirs (`tools=`).
        self.tools = tools
        # Every id a turn can end on: the template's end-of-turn tokens (Phi's <|end|> besides its EOS
        # <|endoftext|>) and generation_config's EOS list (Llama 3.1's <|eom_id|>), or replies run on.
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        configured = [] if configured is None else [configured] if isinstance(configured, int) else configured
        stops = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer), *configured]
        self.stop_ids = [t for t in dict.fromkeys(stops) if t is not None]
        # A plain model folder may have no pad token; generate needs one only for its bookkeeping.
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop_ids or [0])[0]

    def reset(self) -> None:
        self.history = list(self.system)

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to `text`, piece by piece; the history keeps both turns. Closing the
        iterator early stops generation and leaves the history as it was."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer, set_seed

        from qalign.chat_template import prompt_ids

        self.history.append({"role": "user", "content": text})
        # The prompt as training rows have it (BOS included the same way), so the model sees what it was
        # trained on.
        try:
            prompt = prompt_ids(self.tokenizer, self.history, self.tools)
        except UserError:
            self.history.pop()
            raise
        ids = torch.tensor([prompt], device=self.model.device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if self.seed is not None:
            set_seed(self.seed)  # the same seed gives the same answer: scripts can rely on it
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        cancel = threading.Event()
        kwargs = {
            **inputs,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)]),
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            **(sampling if self.temperature > 0 else {"do_sample": False}),
        }
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        pieces, finished = [], False
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
            finished = True
        finally:
            cancel.set()
            worker.join()
            if errors or not finished:
                self.history.pop()  # an unanswered turn would leave two user turns in a row
        if errors:
            raise errors[0]
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})


def read_tools(path: Path) -> list[dict] | None:
    """`qalign chat --tools FILE`: a JSON list of function definitions, read as a training row's "tools"."""
    import json

    from qalign.conversation import parse_tools

    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise UserError(f"--tools {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"--tools {path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}"
        ) from None
    return parse_tools(data, f"--tools {path}")


def chat(
    target: Path,
    stage: str | None,
    prompt: str | None,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int | None,
    console: Console,
    overrides: list[str] | None = None,
    input_fn: Callable[[str], str] = input,
    warn: Callable[[str], None] | None = None,
    system: str | None = None,
    tools: list[dict] | None = None,
) -> ChatSession:
    """One answer for `prompt`, or an interactive loop with /reset and /exit. Returns the session."""
    from qalign.template_text import ignores_tools

    warn = warn or (lambda m: None)
    model, tokenizer, described = load_target(target, stage, overrides, warn)
    if tools and ignores_tools(tokenizer, [{"role": "user", "content": "Hi"}], tools):
        warn(
            "--tools: this model's chat template does not render tool definitions; the model will not see them"
        )
    session = ChatSession(model, tokenizer, temperature, top_p, max_new_tokens, seed, system, tools)

    def answer(text: str) -> None:
        pieces = session.reply(text)
        try:
            for piece in pieces:
                console.file.write(piece)
                console.file.flush()
        finally:
            pieces.close()  # on Ctrl-C mid-reply this stops the generating thread
        console.file.write("\n")

    if prompt is not None:
        answer(prompt)
        return session
    console.print(f"chatting with {described}; /reset clears the conversation, /exit leaves", highlight=False)
    while True:
        try:
            text = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return session
        if text in ("/exit", "/quit"):
            return session
        if text == "/reset":
            session.reset()
            console.print("(conversation cleared)")
            continue
        if text:
            console.file.write("assistant> ")
            try:
                answer(text)
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
                console.print("\n(reply interrupted; the turn is dropped)")
