"""Griffe extension: shows the docstrings' doctest examples as code blocks.

The package's docstrings give their examples as plain `>>>` sessions (run by
tests/test_docstrings.py), not indented under the `Example:` heading, so the
Google-style parser leaves them as text. This extension fences every `>>>`
session (up to the next blank line) as a `pycon` block; fenced code already in a
docstring is left alone.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wraps each run of `>>>` lines and their output in a ```pycon fence."""
    out: list[str] = []
    in_fence = in_session = False
    for line in text.splitlines():
        stripped = line.strip()
        if in_session and not stripped:
            out.append("```")
            in_session = False
        if not in_session and stripped.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_session and stripped.startswith(">>>"):
            if out and out[-1].strip():
                out.append("")
            out.append("```pycon")
            in_session = True
        out.append(line)
    if in_session:
        out.append("```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fences the `>>>` sessions of every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
