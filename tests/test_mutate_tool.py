"""tools/mutate.py: which mutants it makes (no tests are run here)."""

import ast
import importlib.util
import os
import sys
import textwrap

import pytest

TOOL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "mutate.py"
)


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("mutate_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Its dataclasses look their module up.
    spec.loader.exec_module(module)
    return module


SOURCE = '''
"""Module docstring: 1 < 2 is not code."""

import numpy as np


def f(a, b, c=0.5):
    """Docstring with 3 + 4."""
    if a < b and not c:
        raise ValueError(f"bad {a + 1} and {min(a, b)}")
    total = a * b - c
    total += np.max([a, b]) if np.any(a) else 0
    x = (a | b) & ~c
    y = a[1:b] + a[:b]
    z = -a ** 2
    skip = a + b  # pragma: no mutate
    return total, x, y, z, skip is None, True
'''


def _mutants(mutate, tmp_path):
    path = tmp_path / "module.py"
    path.write_text(textwrap.dedent(SOURCE))
    return mutate.generate(str(path))


def test_every_operator_and_nothing_in_messages_or_docstrings(mutate, tmp_path):
    mutants = _mutants(mutate, tmp_path)
    changes = {(m.line, m.change) for m in mutants}
    expected = {
        (9, "`<` -> `<=`"),
        (9, "`<` -> `>=`"),
        (9, "`and` -> `or`"),
        (9, "`not` removed"),
        (11, "`*` -> `/`"),
        (11, "`-` -> `+`"),
        (12, "`+=` -> `-=`"),
        (12, "`max` -> `min`"),
        (12, "`any` -> `all`"),
        (12, "`0` -> `1`"),
        (13, "`|` -> `&`"),
        (13, "`&` -> `|`"),
        (13, "`~` removed"),
        (14, "`1` -> `2`"),
        (14, "slice upper bound `+ 1`"),
        (14, "`+` -> `-`"),
        (15, "`-` removed"),
        (15, "`**` -> `*`"),
        (15, "`2` -> `3`"),
        (17, "`is` -> `is not`"),
        (17, "`True` -> `False`"),
        (7, "`0.5` -> `1.0`"),
    }
    assert expected <= changes, expected - changes
    lines = {m.line for m in mutants}
    assert not lines & {2, 8, 10, 16}  # Docstrings, a raise message, the pragma line.
    assert len({m.mutated for m in mutants}) == len(mutants)  # No duplicates.


def test_mutants_compile_and_differ_by_one_change(mutate, tmp_path):
    original = ast.dump(ast.parse(textwrap.dedent(SOURCE)))
    for m in _mutants(mutate, tmp_path):
        tree = ast.parse(m.mutated)
        assert ast.dump(tree) != original
        changed = [line for line in m.diff.splitlines() if line.startswith(("-", "+"))]
        assert len(changed) == 4, m.diff  # ---/+++ headers, one line out, one line in.
        assert m.mutated_line in m.mutated


def test_equivalent_entries_match_by_line_and_change(mutate, tmp_path):
    mutants = _mutants(mutate, tmp_path)
    path = mutants[0].path
    entries = [
        {"path": path, "line": "x = (a | b) & ~c", "change": "`~` removed", "why": "test"},
        {"path": path, "line": "no such line", "change": "`~` removed", "why": "stale"},
    ]
    stale = mutate._match_equivalents(mutants, entries)
    assert [m.change for m in mutants if m.why_equivalent] == ["`~` removed"]
    assert stale == [entries[1]]
    for m in mutants:
        m.status = "killed"
    mutants[0].status = "survived"
    counts = mutate.summarize(mutants)
    assert counts["killed"] == len(mutants) - 1 and counts["survived"] == 1
    assert counts["score"] == round(100 * (len(mutants) - 1) / len(mutants), 1)
