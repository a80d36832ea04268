"""Printing result tables with rich (kept wide enough when stdout is not a terminal, e.g. in logs and CI)."""

from __future__ import annotations

from typing import Optional, Sequence


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], left: Optional[Sequence[int]] = None
) -> None:
    """``left``: indices of left-aligned columns (default: the first only; the others hold numbers)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 200
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify='left' if i in (left if left is not None else (0,)) else 'right', no_wrap=True)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    console.print(table)
