"""Plain aligned text tables for the terminal."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """Columns padded to their widest cell; columns in `right` (default: every column but the
    first) are right-aligned, as numbers read best."""
    right = set(range(1, len(headers))) if right is None else right
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
