"""Renders the published tables from the recorded results: nobody types a figure.

Every benchmark writes `benchmarks/results/<name>.json` (`benchmarks/_results.py`:
command, commit, date, machine and the raw values). The documents hold marker
blocks

    <!-- render:NAME -->
    ...generated Markdown...
    <!-- /render:NAME -->

and this script replaces each block's body with what the renderer `NAME`
returns. Renderers are plug-ins: every module `benchmarks/_render_*.py`
defines `RENDERERS = {"NAME": fn}`, where `fn(load)` returns Markdown and
`load(result_name)` returns the parsed `benchmarks/results/<result_name>.json`
(a renderer that asks for an absent result gets a "not measured" line instead).

    python benchmarks/render.py            # rewrite BENCHMARKS.md and README.md in place
    python benchmarks/render.py --check    # exit 1 if a committed document is stale

Only the standard library is imported (no TensorFlow): the check runs in a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCUMENTS = ("BENCHMARKS.md", "README.md")
BLOCK = re.compile(
    r"(?P<open><!-- render:(?P<name>[A-Za-z0-9_.-]+) -->\n)(?P<body>.*?)"
    r"(?P<close><!-- /render:(?P=name) -->)",
    re.S,
)
OPEN = re.compile(r"<!-- render:([A-Za-z0-9_.-]+) -->")
# Renderers provided by modules that may not be merged yet (name -> module).
EXPECTED_ELSEWHERE = {
    "speed-head": "_render_speed.py",
    "speed-resnet20": "_render_speed.py",
    "head-memory": "_render_speed.py",
    "precision": "_render_speed.py",
}


class MissingResult(FileNotFoundError):
    """A renderer asked for a result file that does not exist."""

    def __init__(self, name: str, path: Path):
        super().__init__(f"no recorded result {path}")
        self.name = name
        self.path = path


def load_renderers(directory: Path = HERE) -> dict[str, tuple[Callable, str]]:
    """`{block name: (fn, module file)}` from every `_render_*.py` in `directory`.

    Raises:
        ValueError: If a module has no `RENDERERS` dict or two modules define the
            same block name.
    """
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))  # Renderers import their helpers (`_tables`).
    found: dict[str, tuple[Callable, str]] = {}
    for path in sorted(directory.glob("_render_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        renderers = getattr(module, "RENDERERS", None)
        if not isinstance(renderers, dict):
            raise ValueError(f"{path.name} must define a dict RENDERERS. Received: {renderers!r}")
        for name, fn in renderers.items():
            if name in found:
                raise ValueError(
                    f"Block {name!r} is defined by both {found[name][1]} and {path.name}. "
                    f"Received: duplicate name {name!r}"
                )
            found[name] = (fn, path.name)
    return found


def make_loader(results: Path) -> Callable[[str], dict]:
    """`load(name)`: the parsed `results/<name>.json` (cached); `MissingResult` if absent."""
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            path = results / f"{name}.json"
            if not path.is_file():
                raise MissingResult(name, path)
            cache[name] = json.loads(path.read_text(encoding="utf-8"))
        return cache[name]

    return load


def render_block(name: str, renderers: dict, load: Callable) -> str:
    """The Markdown body of block `name` (ending in a newline)."""
    fn, _ = renderers[name]
    try:
        body = fn(load)
    except MissingResult as missing:
        body = (
            f"*Not measured yet: `benchmarks/results/{missing.name}.json` is not recorded "
            "(run the benchmark named in this section, then `python benchmarks/render.py`).*"
        )
    return body.strip("\n") + "\n"


def render_text(text: str, renderers: dict, load: Callable) -> tuple[str, list[str], list[str]]:
    """Renders every block of a document.

    Returns:
        `(new_text, changed block names, problems)`; a block without a renderer
        keeps its body and is reported as a problem, and so is a marker that is
        never closed.
    """
    problems, changed = [], []
    closed = {m.group("name") for m in BLOCK.finditer(text)}
    for name in OPEN.findall(text):
        if name not in closed:
            problems.append(f"block {name!r} has no closing `<!-- /render:{name} -->`")

    def replace(match):
        name = match.group("name")
        if name not in renderers:
            where = EXPECTED_ELSEWHERE.get(name)
            hint = f" (expected from benchmarks/{where}, not present)" if where else ""
            problems.append(f"no renderer for block {name!r}{hint}")
            return match.group(0)
        body = render_block(name, renderers, load)
        if body != match.group("body"):
            changed.append(name)
        return match.group("open") + body + match.group("close")

    return BLOCK.sub(replace, text), changed, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document is stale")
    parser.add_argument("--root", default=str(ROOT), help="directory holding the documents")
    parser.add_argument("--results", help="results directory (default: ROOT/benchmarks/results)")
    parser.add_argument("--documents", default=",".join(DOCUMENTS), help="comma-separated")
    args = parser.parse_args(argv)
    root = Path(args.root)
    results = Path(args.results) if args.results else root / "benchmarks" / "results"
    renderers = load_renderers()
    load = make_loader(results)
    status = 0
    for name in args.documents.split(","):
        path = root / name
        if not path.is_file():
            print(f"{name}: missing", file=sys.stderr)
            status = 1
            continue
        text = path.read_text(encoding="utf-8")
        new, changed, problems = render_text(text, renderers, load)
        for problem in problems:
            print(f"{name}: {problem}", file=sys.stderr)
        if problems:
            status = 1
        if args.check:
            for block in changed:
                print(
                    f"{name}: block {block!r} differs from what its results render "
                    "(run `python benchmarks/render.py`)",
                    file=sys.stderr,
                )
            status = status or (1 if changed else 0)
        elif new != text:
            staging = path.with_suffix(path.suffix + ".partial")
            staging.write_text(new, encoding="utf-8")
            staging.replace(path)
            print(f"{name}: rendered {', '.join(changed)}")
        else:
            print(f"{name}: up to date")
    return status


if __name__ == "__main__":
    sys.exit(main())
