"""`data.columns`: a dataset's own column names mapped onto the fields its format reads, before anything
else looks at the rows, so `format: auto`, every format's checks and their errors see the format's names."""

from __future__ import annotations

import difflib

from qalign.data import Row
from qalign.errors import UserError


def mapping_problem(columns: dict[str, str], fields: tuple[str, ...]) -> str | None:
    """What is wrong with a recipe's `data.columns` (field: column), given the fields the stage reads."""
    for field, column in columns.items():
        if field not in fields:
            close = difflib.get_close_matches(field, fields, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            return f"unknown field '{field}'; {hint}the fields are: {', '.join(fields)}"
        if not column.strip():
            return f"'{field}' names no column"
    readers: dict[str, str] = {}
    for field, column in columns.items():
        if column in readers:
            # One column cannot be two things: a prompt that is also the completion trains on the prompt.
            first = readers[column]
            return f"'{first}' and '{field}' both read column '{column}'; map each field to its own column"
        readers[column] = field
    return None


def map_columns(rows: list[Row], columns: dict[str, str], key: str) -> tuple[list[Row], list[str]]:
    """The rows with each field read from its column (field: column), and a note for each field whose own
    name is also a column of the data, which the mapping shadows. `key` is the recipe key, e.g.
    "sft.data.columns". A mapped column is renamed, not copied: the old name is gone from the row (so a swap,
    {prompt: completion, completion: prompt}, swaps)."""
    if not columns or all(field == column for field, column in columns.items()):
        return rows, []
    sources = set(columns.values())
    shadowed: dict[str, str] = {}
    out = []
    for row in rows:
        data = row.data
        for field, column in columns.items():
            if column not in data:
                present = ", ".join(data) if data else "no columns"
                raise UserError(
                    f"{row.where}: column '{column}' ({key}.{field}) is missing; the row has: {present}"
                )
            if field != column and field in data and field not in sources:
                shadowed.setdefault(field, column)
        mapped = {name: value for name, value in data.items() if name not in sources}
        mapped.update({field: data[column] for field, column in columns.items()})
        out.append(Row(row.where, mapped))
    notes = [
        f"{key}.{field}: reads column '{column}'; the data's own '{field}' column is not used"
        for field, column in shadowed.items()
    ]
    return out, notes
