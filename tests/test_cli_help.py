"""The help reads as users expect, bare `qalign` is not an error, and the README's CLI table matches --help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from qalign.cli import app

runner = CliRunner()
README = Path(__file__).parent.parent / "README.md"
COMMANDS = typer.main.get_command(app).commands


def test_bare_qalign_prints_help_and_exits_0():
    result = runner.invoke(app, [])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "init" in result.output and "validate" in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_has_no_python_types(name: str):
    result = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for python in ("<bool>", "<list[str]>", "<str>", "<int>", "<float>", "{recipe}", "{RECIPE}", "[recipe]"):
        assert python not in result.output, f"qalign {name} --help shows {python}"


def test_help_names_the_values():
    sft = runner.invoke(app, ["sft", "--help"], terminal_width=200).output
    assert re.search(r"Usage: .* sft \[OPTIONS\] RECIPE\b", sft)
    assert re.search(r"--set\s+KEY=VALUE", sft)
    merge = runner.invoke(app, ["merge", "--help"], terminal_width=200).output
    assert "[OPTIONS] [RECIPE]" in merge and re.search(r"--dtype\s+bf16\|fp16\|fp32", merge)
    root = runner.invoke(app, ["--help"], terminal_width=200).output
    assert re.search(r"--version\s+Print the version", root)


def readme_rows() -> dict[str, str]:
    """Command name -> its row of the README's CLI table, with the table's escaped pipes restored."""
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `qalign ([a-z]+)[ `]", line)
        if match:
            rows[match.group(1)] = line.replace("\\|", "|")
    return rows


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_readme_cli_table_matches_help(name: str):
    rows = readme_rows()
    assert name in rows, f"the README's CLI table has no row for qalign {name}"
    row, command = rows[name], COMMANDS[name]
    options = set()
    for param in command.params:
        if param.param_type_name == "argument":
            assert param.metavar in row, f"qalign {name}: argument {param.metavar} missing from the README"
            continue
        long = next(opt for opt in param.opts if opt.startswith("--"))
        options.add(long)
        shown = f"{long} {param.metavar}" if param.metavar else long
        assert shown in row, f"qalign {name}: `{shown}` missing from the README's CLI table"
    named = set(re.findall(r"--[a-z][a-z-]*", row))
    assert named <= options, f"qalign {name}: the README names options it does not have: {named - options}"
