"""The one place the CLI makes rich consoles.

On a terminal rich fits tables to the window. Piped into a file or a CI log there is no window: rich
then assumes 80 columns and cuts headers to "latency rat…". Here a console that does not write to a
terminal is wide (``PIPE_WIDTH`` columns) and plain (no colour codes, no soft wrapping of long
lines), and :func:`table` makes tables whose columns never truncate: cells fold onto the next line
instead of ending in an ellipsis.
"""

from __future__ import annotations

import io
import sys
from typing import Any

# Wide enough for every table onnxforge prints; a CI log viewer scrolls horizontally.
PIPE_WIDTH = 200


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def console(*, stderr: bool = False, quiet: bool = False, discard: bool = False, **kwargs: Any):
    """A ``rich.console.Console`` on stdout (or stderr) that is full width when not a terminal.

    ``discard=True`` writes nowhere (stdout is reserved for JSON); ``quiet`` prints nothing.
    """
    from rich.console import Console

    if discard:
        return Console(file=io.StringIO(), quiet=quiet, **kwargs)
    stream = sys.stderr if stderr else sys.stdout
    if _is_tty(stream):
        return Console(stderr=stderr, quiet=quiet, **kwargs)
    kwargs.setdefault("highlight", False)
    # file=stream (not stderr=...): click's CliRunner swaps sys.stdout after import.
    return Console(file=stream, quiet=quiet, width=PIPE_WIDTH, no_color=True, soft_wrap=False,
                   emoji=False, **kwargs)


def table(*args: Any, **kwargs: Any):
    """A ``rich.table.Table`` whose added columns fold rather than truncate with "…"."""
    from rich.table import Table

    class _FoldingTable(Table):
        def add_column(self, *a: Any, **kw: Any) -> None:
            kw.setdefault("overflow", "fold")
            kw["no_wrap"] = False  # a no-wrap cell that does not fit ends in "…"
            super().add_column(*a, **kw)

    kwargs.setdefault("title_justify", "left")
    return _FoldingTable(*args, **kwargs)


__all__ = ["PIPE_WIDTH", "console", "table"]
