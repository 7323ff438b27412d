"""User text in Markdown that digi2real writes (the dataset card, the Hub card, verification
tables): escaped so that it stays one line of plain text or one code span, whatever it holds."""

from __future__ import annotations

import html
import re
from typing import Any


def text(value: Any) -> str:
    """User text in Markdown, prose or a table cell: one line (any run of whitespace, newlines
    included, is one space), no HTML (``& < >`` as entities), no table ``|``, no link (``[ ]``
    escaped, and ``\\`` so that no escape can be undone), no code span (a backtick becomes
    ``'``)."""
    escaped = html.escape(" ".join(str(value).split()), quote=False).replace("`", "'")
    return re.sub(r"([\\|\[\]])", r"\\\1", escaped)


def code(value: Any, *, table: bool = False) -> str:
    """User text as a Markdown code span (nothing inside one is markup or HTML); ``table``:
    inside a table cell, where a ``|`` would end the cell even within the span unless an odd
    number of backslashes precedes it."""
    spaced = " ".join(str(value).split()).replace("`", "'")
    if table:
        spaced = re.sub(r"(\\*)\|", lambda match: match.group(1) * 2 + "\\|", spaced)
    return "`" + spaced + "`"
