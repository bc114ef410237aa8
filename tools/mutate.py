"""Mutation testing for keras-isomax: one module, the tests that exercise it.

Each mutant is a one-token change to the module's source (a flipped
comparison, a swapped operator, a tweaked constant, ...). The module's mapped
test files (tools/mutation.toml) run against every mutant, one at a time, on
a copy of the repository; a mutant is *killed* when a test fails, and
*survives* when every test passes: then no test pins that behaviour (or the
mutant is equivalent: it cannot change any result; list it, with the reason,
in tools/mutation.toml).

    python tools/mutate.py losses              # run, report in outputs/mutation/
    python tools/mutate.py losses --list       # the mutants only, no tests run
    python tools/mutate.py losses --lines 120-140 --max 20

Speed: TensorFlow and Keras are imported once by this process; each mutant
runs in a forked child (pytest in-process, `-x`), so a mutant costs its tests'
run time, not a fresh interpreter. `--no-fork` runs a fresh `python -m pytest`
per mutant instead (slower; for when forking misbehaves).
See docs/contributing.md ("Mutation testing").
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import fnmatch
import glob
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tools", "mutation.toml")
# Copied to the scratch repository (tests read files from it; subprocesses import it).
SKIP_DIRS = {".git", ".venv", "outputs", "build", "dist", "__pycache__", ".hypothesis", "mutants"}

# ------------------------------------------------------------------ mutants

COMPARISONS = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
ARITHMETIC = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,  # Boolean masks: `a & b` is an `and`.
    ast.BitOr: ast.BitAnd,
}
BOOLEAN = {ast.And: ast.Or, ast.Or: ast.And}
# Calls swapped by their last name (`min`, `np.min`, `ops.min`, `tf.reduce_min`, ...).
CALL_SWAPS = {
    "min": "max",
    "max": "min",
    "minimum": "maximum",
    "maximum": "minimum",
    "nanmin": "nanmax",
    "nanmax": "nanmin",
    "argmin": "argmax",
    "argmax": "argmin",
    "any": "all",
    "all": "any",
    "reduce_min": "reduce_max",
    "reduce_max": "reduce_min",
    "reduce_any": "reduce_all",
    "reduce_all": "reduce_any",
    "floor": "ceil",
    "ceil": "floor",
}
SYMBOLS = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.And: "and",
    ast.Or: "or",
    ast.USub: "-",
    ast.Not: "not",
    ast.Invert: "~",
}
# Calls whose arguments are messages: mutating them changes only the text.
MESSAGE_CALLS = {"warn", "debug", "info", "warning", "error", "exception", "critical", "print"}
PRAGMA = "pragma: no mutate"


@dataclasses.dataclass
class Mutant:
    index: int
    path: str  # Relative to the repository.
    line: int
    end_line: int
    operator: str  # e.g. "comparison", "constant"
    change: str  # e.g. "`<` -> `<=`"
    source_line: str  # The original first line, stripped (the key of equivalents).
    mutated_line: str = ""  # The same line after the change, stripped.
    mutated: str = dataclasses.field(repr=False, default="")
    diff: str = ""
    status: str = "pending"
    seconds: float = 0.0
    detail: str = ""
    why_equivalent: str = ""

    def key(self):
        return {"path": self.path, "line": self.source_line, "change": self.change}


class _Collector(ast.NodeVisitor):
    """Finds mutation sites: `(node, replacement node, operator, change)`."""

    def __init__(self, skipped_lines):
        self.sites = []
        self.skipped_lines = skipped_lines
        self._quiet = 0  # > 0 inside messages, docstrings, annotations.

    def _add(self, node, new, operator, change):
        if self._quiet or node.lineno in self.skipped_lines:
            return
        self.sites.append((node, new, operator, change))

    def _visit_quietly(self, *nodes):
        self._quiet += 1
        for node in nodes:
            if node is not None:
                self.visit(node)
        self._quiet -= 1

    # -- what is not mutated
    def _body(self, node):
        body = list(node.body)
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # The docstring.
        return body

    def visit_Module(self, node):
        for child in self._body(node):
            self.visit(child)

    def visit_ClassDef(self, node):
        for child in node.decorator_list + node.bases + node.keywords:
            self.visit(child)
        for child in self._body(node):
            self.visit(child)

    def visit_FunctionDef(self, node):
        for child in node.decorator_list:
            self.visit(child)
        self._visit_quietly(node.returns, *_annotations(node.args))
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
            self.visit(default)
        for child in self._body(node):
            self.visit(child)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        self._visit_quietly(node.annotation)
        if node.value is not None:
            self.visit(node.value)

    def visit_Raise(self, node):
        self._visit_quietly(node.exc, node.cause)  # The error still raises: only its text.

    def visit_Assert(self, node):
        self.visit(node.test)
        self._visit_quietly(node.msg)

    def visit_JoinedStr(self, node):
        self._visit_quietly(*node.values)

    def visit_If(self, node):
        test = node.test
        if (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "__name__"
        ):
            return
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            return
        self.generic_visit(node)

    def visit_Call(self, node):
        name = _call_name(node.func)
        if name in MESSAGE_CALLS:
            self.visit(node.func)
            self._visit_quietly(*node.args, *node.keywords)
            return
        if name in CALL_SWAPS:
            new = copy.deepcopy(node)
            _rename_call(new.func, CALL_SWAPS[name])
            self._add(node, new, "call", f"`{name}` -> `{CALL_SWAPS[name]}`")
        self.generic_visit(node)

    # -- operators
    def visit_Compare(self, node):
        for i, op in enumerate(node.ops):
            for replacement in COMPARISONS.get(type(op), ()):
                new = copy.deepcopy(node)
                new.ops[i] = replacement()
                self._add(
                    node,
                    new,
                    "comparison",
                    f"`{SYMBOLS[type(op)]}` -> `{SYMBOLS[replacement]}`",
                )
        self.generic_visit(node)

    def visit_BinOp(self, node):
        replacement = ARITHMETIC.get(type(node.op))
        if replacement is not None and not _is_string(node):
            new = copy.deepcopy(node)
            new.op = replacement()
            self._add(
                node,
                new,
                "arithmetic",
                f"`{SYMBOLS[type(node.op)]}` -> `{SYMBOLS[replacement]}`",
            )
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        replacement = ARITHMETIC.get(type(node.op))
        if replacement is not None:
            new = copy.deepcopy(node)
            new.op = replacement()
            self._add(
                node,
                new,
                "arithmetic",
                f"`{SYMBOLS[type(node.op)]}=` -> `{SYMBOLS[replacement]}=`",
            )
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        replacement = BOOLEAN[type(node.op)]
        new = copy.deepcopy(node)
        new.op = replacement()
        self._add(node, new, "boolean", f"`{SYMBOLS[type(node.op)]}` -> `{SYMBOLS[replacement]}`")
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.USub | ast.Not | ast.Invert):
            if not (isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)):
                self._add(
                    node,
                    copy.deepcopy(node.operand),
                    "unary",
                    f"`{SYMBOLS[type(node.op)]}` removed",
                )
        self.generic_visit(node)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            self._add(node, ast.Constant(not value), "constant", f"`{value}` -> `{not value}`")
        elif isinstance(value, int):
            self._add(node, ast.Constant(value + 1), "constant", f"`{value}` -> `{value + 1}`")
        elif isinstance(value, float):
            new = value + 1.0 if value == 0.0 else value * 2.0
            self._add(node, ast.Constant(new), "constant", f"`{value!r}` -> `{new!r}`")

    def visit_Slice(self, node):
        for name in ("lower", "upper"):
            bound = getattr(node, name)
            if bound is None or _is_int_literal(bound):
                continue  # A literal bound is the constant operator's.
            new = ast.BinOp(left=copy.deepcopy(bound), op=ast.Add(), right=ast.Constant(1))
            self._add(bound, new, "slice", f"slice {name} bound `+ 1`")
        self.generic_visit(node)


def _annotations(args):
    every = args.posonlyargs + args.args + args.kwonlyargs
    every += [a for a in (args.vararg, args.kwarg) if a is not None]
    return [a.annotation for a in every if a.annotation is not None]


def _call_name(func):
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _rename_call(func, name):
    if isinstance(func, ast.Name):
        func.id = name
    else:
        func.attr = name


def _is_string(node):
    return any(
        isinstance(n, ast.Constant) and isinstance(n.value, str) for n in (node.left, node.right)
    )


def _is_int_literal(node):
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int


def generate(path, line_range=None):
    """The mutants of one source file, in source order, without duplicates."""
    source = open(os.path.join(REPO, path), encoding="utf-8").read()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    skipped = {i + 1 for i, text in enumerate(lines) if PRAGMA in text}
    collector = _Collector(skipped)
    collector.visit(tree)
    encoded = [line.encode("utf-8") for line in lines]
    original_dump = ast.dump(tree)
    mutants, seen = [], set()
    for node, new, operator, change in sorted(
        collector.sites, key=lambda s: (s[0].lineno, s[0].col_offset)
    ):
        if line_range and not (line_range[0] <= node.lineno <= line_range[1]):
            continue
        text = ast.unparse(new)
        if isinstance(node, ast.expr) and not isinstance(node, ast.Constant | ast.Name):
            text = f"({text})"
        mutated = _replace(encoded, node, text)
        try:
            mutated_tree = ast.parse(mutated)
        except SyntaxError:
            continue
        digest = hashlib.sha1(mutated.encode()).hexdigest()
        if digest in seen or ast.dump(mutated_tree) == original_dump:
            continue
        seen.add(digest)
        diff = "".join(
            difflib.unified_diff(
                source.splitlines(keepends=True),
                mutated.splitlines(keepends=True),
                fromfile=path,
                tofile=path,
                n=0,
            )
        )
        mutants.append(
            Mutant(
                index=len(mutants),
                path=path,
                line=node.lineno,
                end_line=node.end_lineno,
                operator=operator,
                change=change,
                source_line=lines[node.lineno - 1].strip(),
                mutated_line=_first_changed_line(diff),
                mutated=mutated,
                diff=diff,
            )
        )
    return mutants


def _first_changed_line(diff):
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def _replace(encoded, node, text):
    """The source with `node`'s span (UTF-8 byte offsets) replaced by `text`."""
    first, last = node.lineno - 1, node.end_lineno - 1
    before = encoded[first][: node.col_offset]
    after = encoded[last][node.end_col_offset :]
    new_lines = encoded[:first] + [before + text.encode("utf-8") + after] + encoded[last + 1 :]
    return b"".join(new_lines).decode("utf-8")


# ------------------------------------------------------------------ running


def _copy_repo(scratch):
    def ignore(directory, names):
        return {n for n in names if n in SKIP_DIRS or n.endswith(".pyc")}

    for name in os.listdir(REPO):
        if name in SKIP_DIRS:
            continue
        src, dst = os.path.join(REPO, name), os.path.join(scratch, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=ignore, symlinks=True)
        elif os.path.isfile(src):
            shutil.copy2(src, dst)


def _pytest_args(tests, extra):
    return [*tests, "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *extra]


class Runner:
    """Runs the mapped tests in the scratch repository, forked or fresh."""

    def __init__(self, scratch, tests, extra, fork, env, log_dir):
        self.scratch = scratch
        self.tests = tests
        self.extra = extra
        self.fork = fork
        self.env = env
        self.log_dir = log_dir

    def preload(self, modules):
        """Imports the heavy dependencies once, before any fork (never the library)."""
        os.environ.update(self.env)
        os.chdir(self.scratch)
        sys.path.insert(0, self.scratch)
        for name in modules:
            try:
                __import__(name)
            except ImportError:
                pass
        import pytest  # noqa: F401

        if any(name.startswith("keras_isomax") for name in sys.modules):
            raise RuntimeError("The library was imported before forking: results would be stale.")

    def run(self, name, timeout, tests=None, extra=()):
        """`(status, detail, seconds)`; status in killed/survived/timeout/error.

        `tests`: these pytest node ids instead of the module's mapped tests.
        """
        log = os.path.join(self.log_dir, f"{name}.log")
        args = _pytest_args(self.tests if tests is None else tests, [*self.extra, *extra])
        start = time.monotonic()
        if self.fork:
            code = self._run_forked(log, timeout, args)
        else:
            code = self._run_fresh(log, timeout, args)
        seconds = time.monotonic() - start
        return _classify(code, log, selected=tests is not None) + (seconds,)

    def _run_forked(self, log, timeout, args):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # The child: its own process group, output to the log.
            code = 4
            try:
                os.setpgid(0, 0)
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                import pytest

                code = int(pytest.main(args))
            except BaseException as error:  # noqa: BLE001
                print(f"mutate.py: child error {error!r}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return _wait(pid, timeout)

    def _run_fresh(self, log, timeout, args):
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "pytest", *args],
                cwd=self.scratch,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            return _wait(process.pid, timeout, process)


def _wait(pid, timeout, process=None):
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                if os.WIFSIGNALED(status):
                    return ("signal", os.WTERMSIG(status))
                return ("exit", os.WEXITSTATUS(status))
            if time.monotonic() > deadline:
                _kill_group(pid)
                return ("timeout", None)
            time.sleep(0.05)
    except BaseException:  # Interrupted (Ctrl-C, SIGTERM): no orphaned test run.
        _kill_group(pid)
        raise


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)  # The child's group: its subprocesses too.
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _classify(code, log, selected=False):
    kind, value = code
    if kind == "timeout":
        return ("timeout", "")
    if kind == "signal":
        return ("error", f"killed by signal {value}")
    # pytest: 0 passed, 1 tests failed, 2 interrupted (collection errors: the
    # mutant broke the import), 3 internal error, 4 usage error, 5 no tests.
    if value == 0:
        return ("survived", "")
    failure = _first_failure(log)
    if value in (1, 2) or (value == 4 and failure.startswith("ERROR ") and not selected):
        return ("killed", failure)  # 4: node ids not collected (the import failed).
    return ("error", f"pytest exit code {value}")


def _first_failure(log):
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("FAILED ", "ERROR ")):
                    return line.strip()[:200]
    except OSError:
        pass
    return ""


# ------------------------------------------------------------------ coverage


def coverage_map(data_file, scratch, paths):
    """`{path: {line: set of contexts}}` from a `--cov-context=test` run.

    A context is a pytest node id with its phase (`...::test_x|run`, `|setup`,
    `|teardown`); `""` is code run outside any test (imports at collection).
    """
    from coverage import CoverageData

    data = CoverageData(basename=data_file)
    data.read()
    measured = {os.path.realpath(f): f for f in data.measured_files()}
    result = {}
    for path in paths:
        name = measured.get(os.path.realpath(os.path.join(scratch, path)))
        result[path] = (
            {line: set(c) for line, c in data.contexts_by_lineno(name).items()} if name else {}
        )
    return result


def select_tests(mutant, lines, mapped):
    """The node ids that run the mutated span; `None`: all the mapped tests.

    `[]` when no test runs it. A line run while a fixture is set up selects
    the whole test file (other tests of the file share the fixture's result);
    a line run outside any test (at import) selects everything.
    """
    contexts = set()
    for line in range(mutant.line, mutant.end_line + 1):
        contexts |= lines.get(line, set())
    selected = set()
    for context in contexts:
        node, _, phase = context.rpartition("|")
        if not node:
            return None
        selected.add(node.split("::")[0] if phase == "setup" else node)
    files = {n for n in selected if "::" not in n}
    chosen = {n for n in selected if "::" in n and n.split("::")[0] not in files}
    for file in files:  # The file as far as it is mapped (it may be a few node ids).
        chosen |= {t for t in mapped if t == file or t.startswith(file + "::")}
    return sorted(chosen)


# ------------------------------------------------------------------ report


def _match_equivalents(mutants, entries):
    used = set()
    for mutant in mutants:
        for i, entry in enumerate(entries):
            if (
                entry.get("path", mutant.path) == mutant.path
                and entry["line"].strip() == mutant.source_line
                and entry["change"] == mutant.change
                and entry.get("mutated", mutant.mutated_line).strip() == mutant.mutated_line
            ):
                mutant.why_equivalent = entry["why"]
                used.add(i)
    return [entry for i, entry in enumerate(entries) if i not in used]


def summarize(mutants):
    counts = {}
    for m in mutants:
        status = m.status
        if status == "survived" and m.why_equivalent:
            status = "equivalent"
        counts[status] = counts.get(status, 0) + 1
    detected = counts.get("killed", 0) + counts.get("timeout", 0)
    scored = detected + counts.get("survived", 0)
    counts["score"] = round(100.0 * detected / scored, 1) if scored else None
    return counts


def write_report(module, config, mutants, stale, counts, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, module)
    payload = {
        "module": module,
        "sources": config["sources"],
        "tests": config["tests"],
        "counts": counts,
        "meta": meta,
        "stale_equivalents": stale,
        "mutants": [
            {
                k: v
                for k, v in dataclasses.asdict(m).items()
                if k not in ("mutated",) and (v or k in ("index", "line"))
            }
            for m in mutants
        ],
    }
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    lines = [
        f"# Mutation testing: {module}",
        "",
        f"Sources: {', '.join(config['sources'])}  ",
        f"Tests: {' '.join(config['tests'])}  ",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; wall time {meta['wall_seconds']:.0f} s; "
        f"baseline tests {meta['baseline_seconds']:.1f} s; mode {meta['mode']}; backend {meta['backend']}",
        "",
        f"**Score: {counts['score']} % killed** (killed + timeout over killed + timeout + "
        "survived; equivalent mutants excluded)",
        "",
        "| status | count |",
        "| --- | ---: |",
    ]
    for status in ("killed", "timeout", "survived", "equivalent", "error", "pending"):
        if counts.get(status):
            lines.append(f"| {status} | {counts[status]} |")
    for title, wanted in (("Survivors", "survived"), ("Errors", "error")):
        chosen = [m for m in mutants if m.status == wanted and not m.why_equivalent]
        if not chosen:
            continue
        lines += ["", f"## {title}", ""]
        for m in chosen:
            lines += [
                f"### #{m.index} {m.path}:{m.line} ({m.operator}: {m.change}) {m.detail}",
                "",
                "```diff",
                m.diff.rstrip(),
                "```",
                "",
            ]
    equivalents = [m for m in mutants if m.why_equivalent and m.status == "survived"]
    if equivalents:
        lines += ["", "## Equivalent (listed in tools/mutation.toml)", ""]
        for m in equivalents:
            lines.append(f"- #{m.index} {m.path}:{m.line} {m.change}: {m.why_equivalent}")
    killed_equivalents = [m for m in mutants if m.why_equivalent and m.status != "survived"]
    if killed_equivalents or stale:
        lines += ["", "## Equivalent entries to review", ""]
        for m in killed_equivalents:
            lines.append(f"- listed as equivalent but {m.status}: {m.path}:{m.line} {m.change}")
        for entry in stale:
            lines.append(f"- matches no mutant (stale?): {entry}")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return base + ".md"


def _machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    return f"{model}, {os.cpu_count()} cores, TF_ENABLE_ONEDNN_OPTS={onednn}"


# ------------------------------------------------------------------ main


def load_config(module):
    with open(CONFIG, "rb") as f:
        config = tomllib.load(f)
    modules = config.get("modules", {})
    if module not in modules:
        raise SystemExit(f"Unknown module {module!r}; configured: {', '.join(sorted(modules))}")
    entry = dict(config.get("defaults", {}))
    entry.update(modules[module])
    sources = entry["source"] if isinstance(entry["source"], list) else [entry["source"]]
    files = []
    for pattern in sources:
        matched = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, pattern)))
        files += [
            p for p in matched if not any(fnmatch.fnmatch(p, x) for x in entry.get("exclude", []))
        ]
    if not files:
        raise SystemExit(f"{module}: source {sources!r} matches no file")
    entry["sources"] = files
    entry.setdefault("equivalent", [])
    return entry


def _run_mutant(runner, m, timeout, lines, mapped, args):
    """Sets `m.status`, `m.detail`, `m.seconds`: the selected tests first, then all."""
    name = f"mutant-{m.index}"
    seconds = 0.0
    tests = select_tests(m, lines, mapped) if lines is not None else None
    if tests == [] and args.no_confirm:
        m.status, m.detail, m.seconds = "survived", "no mapped test runs this line", 0.0
        return
    if tests:
        m.status, m.detail, seconds = runner.run(name, timeout, tests=tests)
        if m.status == "killed" or args.no_confirm and m.status == "survived":
            m.seconds = seconds
            if m.status == "survived":
                m.detail = f"{len(tests)} selected tests"
            return
    m.status, m.detail, m.seconds = runner.run(name, timeout)
    if m.status == "timeout":  # A busy machine, or a real hang? Once more, longer.
        m.status, m.detail, m.seconds = runner.run(name, 3 * timeout)
        m.detail = (m.detail + " (on a second run)").strip()
    m.seconds += seconds
    if tests is not None and m.status == "killed":
        m.detail += (
            " (not by the tests that run the line)" if tests else " (no mapped test runs the line)"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="a key of [modules] in tools/mutation.toml")
    parser.add_argument("--list", action="store_true", help="list the mutants; run nothing")
    parser.add_argument("--lines", help="only mutants starting in these lines, e.g. 120-140")
    parser.add_argument("--only", type=int, nargs="*", help="only these mutant indices")
    parser.add_argument("--max", type=int, help="stop after this many mutants")
    parser.add_argument(
        "--survivors-of",
        metavar="REPORT.json",
        help="only the mutants that survived in this earlier report (matched by file, "
        "source line and change, so edits elsewhere in the file do not matter)",
    )
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: from baseline)")
    parser.add_argument("--no-fork", action="store_true", help="a fresh interpreter per mutant")
    parser.add_argument(
        "--backend",
        choices=["tensorflow", "jax", "torch"],
        help="the Keras backend the tests run on (default: the module's, else tensorflow); "
        "code for other backends is only reached there. JAX is not fork-safe: add --no-fork",
    )
    parser.add_argument("--out", default=os.path.join(REPO, "outputs", "mutation"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy and logs")
    parser.add_argument(
        "--no-coverage",
        action="store_true",
        help="run every mapped test against every mutant (no per-line test selection)",
    )
    parser.add_argument(
        "--no-confirm",
        action="store_true",
        help="trust the per-line selection: a survivor of the selected tests is not rerun "
        "against every mapped test (faster; misses tests that run the line in a subprocess)",
    )
    args = parser.parse_args(argv)

    config = load_config(args.module)
    line_range = None
    if args.lines:
        low, _, high = args.lines.partition("-")
        line_range = (int(low), int(high or low))
    mutants = []
    for path in config["sources"]:
        for m in generate(path, line_range):
            m.index = len(mutants)
            mutants.append(m)
    stale = _match_equivalents(mutants, config["equivalent"])
    if args.only is not None:
        mutants = [m for m in mutants if m.index in set(args.only)]
    if args.survivors_of:
        with open(args.survivors_of, encoding="utf-8") as f:
            previous = json.load(f)["mutants"]
        wanted = {
            (p["path"], p["source_line"], p["change"], p.get("mutated_line", ""))
            for p in previous
            if p.get("status") == "survived" and not p.get("why_equivalent")
        }
        mutants = [  # Survivors since listed as equivalent are not rerun.
            m
            for m in mutants
            if (m.path, m.source_line, m.change, m.mutated_line) in wanted and not m.why_equivalent
        ]
    if args.max is not None:
        mutants = mutants[: args.max]
    if args.list:
        for m in mutants:
            flag = " [equivalent]" if m.why_equivalent else ""
            print(f"#{m.index} {m.path}:{m.line} {m.operator}: {m.change}{flag}")
            print("    " + m.diff.splitlines()[-1] if m.diff else "")
        print(f"{len(mutants)} mutants")
        return 0

    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="keras-isomax-mutation-")
    log_dir = os.path.join(scratch, ".mutation-logs")
    os.makedirs(log_dir)
    _copy_repo(scratch)
    env = {
        "PYTHONPATH": scratch,
        "PYTHONDONTWRITEBYTECODE": "1",  # Same-size mutants in one second: stale .pyc.
        "KERAS_BACKEND": args.backend or config.get("backend", "tensorflow"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "HYPOTHESIS_STORAGE_DIRECTORY": os.path.join(scratch, ".hypothesis"),
    }
    sys.dont_write_bytecode = True
    runner = Runner(
        scratch, config["tests"], config.get("pytest_args", []), not args.no_fork, env, log_dir
    )
    mode = "fresh interpreter per mutant" if args.no_fork else "forked after preload"
    if not args.no_coverage:
        mode += "; tests that run the line first" + (
            " (survivors not rerun)" if args.no_confirm else ", then all for survivors"
        )
    try:
        if runner.fork:
            runner.preload(config.get("preload", []))
        print(f"[{args.module}] baseline: {' '.join(config['tests'])}", flush=True)
        coverage_file = os.path.join(scratch, ".mutation-coverage")
        os.environ["COVERAGE_FILE"] = coverage_file
        measure = (
            []
            if args.no_coverage
            else ["--cov=keras_isomax", "--cov-context=test", "--cov-report="]
        )
        status, detail, baseline = runner.run("baseline", args.timeout or 3600, extra=measure)
        if status != "survived":  # The unmutated code must pass.
            print(open(os.path.join(log_dir, "baseline.log")).read()[-5000:])
            raise SystemExit(
                f"Baseline {status} ({detail}): the tests must pass before mutating. "
                + ("" if args.no_fork else "If they pass outside this tool, try --no-fork.")
            )
        # The canary: a module that cannot be imported must fail the tests,
        # or they do not run the scratch copy that the mutants are written to.
        target = os.path.join(scratch, config["sources"][0])
        original = open(target, encoding="utf-8").read()
        with open(target, "w", encoding="utf-8") as f:
            f.write(original + '\nraise ImportError("mutation canary")\n')
        try:
            status, detail, _ = runner.run("canary", args.timeout or 3600)
        finally:
            with open(target, "w", encoding="utf-8") as f:
                f.write(original)
        if status != "killed":
            raise SystemExit(
                f"The canary mutant {status}: the tests do not import the mutated copy "
                f"of {config['sources'][0]} (do they import it at all?)."
            )
        timeout = args.timeout or max(120.0, config.get("timeout_factor", 5.0) * baseline + 60)
        lines_run = (
            {} if args.no_coverage else coverage_map(coverage_file, scratch, config["sources"])
        )
        print(
            f"[{args.module}] baseline {baseline:.1f} s; {len(mutants)} mutants; "
            f"timeout {timeout:.0f} s each",
            flush=True,
        )
        for m in mutants:
            target = os.path.join(scratch, m.path)
            original = open(target, encoding="utf-8").read()
            with open(target, "w", encoding="utf-8") as f:
                f.write(m.mutated)
            try:
                _run_mutant(runner, m, timeout, lines_run.get(m.path), config["tests"], args)
            finally:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(original)
            mark = {"killed": ".", "survived": "S", "timeout": "T", "error": "E"}[m.status]
            if m.status == "survived" and m.why_equivalent:
                mark = "="  # Survived, listed as equivalent.
            print(
                f"{mark} #{m.index} {m.path}:{m.line} {m.change} [{m.seconds:.1f} s] {m.detail}",
                flush=True,
            )
    finally:
        os.chdir(REPO)
        if args.keep:
            print(f"scratch copy and logs kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    counts = summarize(mutants)
    command = "python tools/mutate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": command,
        "machine": _machine(),
        "wall_seconds": time.monotonic() - started,
        "baseline_seconds": baseline,
        "mode": mode,
        "backend": env["KERAS_BACKEND"],
        "timeout_seconds": timeout,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
    }
    report = write_report(args.module, config, mutants, stale, counts, meta, args.out)
    print(
        f"[{args.module}] {counts} in {meta['wall_seconds']:.0f} s; report: "
        f"{os.path.relpath(report, REPO)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
