"""Plain-text tables for the terminal and Markdown reports."""

from __future__ import annotations

from collections.abc import Sequence


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    if markdown:
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    else:
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def format_csv(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return buf.getvalue()


def write_table(stem, rows: Sequence[dict]) -> str:
    """``STEM.md`` and ``STEM.csv`` of dict rows (atomically); returns the terminal table."""
    from pathlib import Path

    from memprune._io import write_text

    stem = Path(stem)
    headers = list(rows[0])
    table = [[row.get(h) for h in headers] for row in rows]
    write_text(stem.with_suffix(".md"), format_table(headers, table, markdown=True) + "\n")
    write_text(stem.with_suffix(".csv"), format_csv(headers, table))
    return format_table(headers, table)


def difference_se(std_a: float, n_a: int, std_b: float, n_b: int) -> float | None:
    """Standard error of the difference of two table rows' means over seeds (``std`` over
    ``n`` seeds each); None when neither row has two seeds: no spread to compare with."""
    if n_a < 2 and n_b < 2:
        return None
    return (std_a**2 / n_a + std_b**2 / n_b) ** 0.5
