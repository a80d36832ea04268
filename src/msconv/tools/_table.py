"""Printing result tables as plain text: a title line, then a Markdown-style table whose columns are padded to their
widest cell (never wrapped or cut, whatever the terminal width: logs and CI keep every digit)."""

from __future__ import annotations

from typing import List, Optional, Sequence


def format_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], left: Optional[Sequence[int]] = None
) -> str:
    """``left``: indices of left-aligned columns (default: the first only; the others hold numbers)."""
    left = (0,) if left is None else tuple(left)
    cells: List[List[str]] = [[str(c) for c in columns]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return '| ' + ' | '.join(padded) + ' |'

    rule = '|' + '|'.join('-' * (w + 1) + (':' if i not in left else '-') for i, w in enumerate(widths)) + '|'
    body = [line(cells[0]), rule] + [line(r) for r in cells[1:]]
    return '\n'.join(([title] if title else []) + body)


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], left: Optional[Sequence[int]] = None
) -> None:
    """Print :func:`format_table`."""
    print(format_table(title, columns, rows, left))
