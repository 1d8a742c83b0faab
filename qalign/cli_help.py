"""Help text as users read it elsewhere: typer subclasses that every qalign command uses."""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


class _PlainHelp:
    """Help as users read it elsewhere: `RECIPE` in the usage line (typer writes `{RECIPE}`), and nothing
    after a flag (typer writes `--overwrite <bool>`)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [re.sub(r"^\{(.+)\}$", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


class PlainCommand(_PlainHelp, TyperCommand):
    pass


class PlainGroup(_PlainHelp, TyperGroup):
    pass


class PlainTyper(typer.Typer):
    # Every command gets the plain help without each decorator having to ask for it.
    def command(self, *args: Any, cls: type | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or PlainCommand, **kwargs)
