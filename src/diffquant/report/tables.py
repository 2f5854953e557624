"""Tables as Markdown, the one renderer of every Markdown table diffquant writes (bench-table, peers.md)."""

from __future__ import annotations


def markdown(headers: list[str], rows: list[list]) -> str:
    """A Markdown table: a header row, its rule, one line per row (cells already formatted as text)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
