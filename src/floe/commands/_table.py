"""A box-drawn text table, drawn like rich's default `Table` (heavy head), without importing rich.

`floe run` prints one at the end of every run; rich costs a tenth of a second of start-up to import
and draw it, a quarter of a run that finds nothing new. Cells are never wrapped: an error message
makes its row as wide as it needs.
"""

from __future__ import annotations

from collections.abc import Sequence


def box_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
              right: frozenset[str] = frozenset()) -> str:
    """`title`, then the columns' header and `rows` in boxes; the columns named in `right` are right-aligned."""
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]

    def line(left: str, fill: str, cross: str, end: str) -> str:
        return left + cross.join(fill * (w + 2) for w in widths) + end

    def cells(values: Sequence[str], bar: str) -> str:
        return bar + bar.join(f" {v.rjust(w) if c in right else v.ljust(w)} "
                              for v, w, c in zip(values, widths, columns, strict=True)) + bar

    top = line("┏", "━", "┳", "┓")
    lines = [title.ljust(len(top)), top, cells(columns, "┃"), line("┡", "━", "╇", "┩")]
    lines += [cells(row, "│") for row in rows]
    lines.append(line("└", "─", "┴", "┘"))
    return "\n".join(lines)
