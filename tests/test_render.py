"""Published figures come from recorded results: `benchmarks/render.py --check`.

The renderer runs as a program (tests and benchmarks do not import each other)
and imports no TensorFlow, so these tests take seconds.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RENDER = ROOT / "benchmarks" / "render.py"
DOCUMENTS = ("BENCHMARKS.md", "README.md")


def _render(*args, root=ROOT):
    return subprocess.run(
        [sys.executable, str(RENDER), *args, "--root", str(root)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.fixture
def copy(tmp_path):
    """The documents and recorded results in a scratch repository root."""
    for name in DOCUMENTS:
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    return tmp_path


def test_committed_documents_match_their_results():
    out = _render("--check")
    assert out.returncode == 0, out.stderr


def test_renderer_imports_no_tensorflow():
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['render.py', '--check', '--root', {str(ROOT)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(RENDER)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_every_table_carries_command_machine_and_commit(copy):
    _render(root=copy)  # What the renderers write now, whatever the committed file holds.
    text = (copy / "BENCHMARKS.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- render:([\w.-]+) -->\n(.*?)<!-- /render:\1 -->", text, re.S)
    assert len(blocks) >= 12
    for name, body in blocks:
        if body.startswith("*Not measured yet"):
            continue
        assert "Command `python benchmarks/" in body, name
        assert re.search(r"machine: \d+-core .+?(oneDNN (on|off)|JAX)", body), name
        assert re.search(r"commit `[0-9a-f]{7,}", body), name


def test_a_hand_edited_figure_fails_the_check(copy):
    path = copy / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    match = re.search(r"(<!-- render:quality-auroc -->\n.*?\| )(\d+\.\d)", text, re.S)
    assert match, "no figure in the quality-auroc block"
    changed = f"{float(match.group(2)) + 1:.1f}"
    path.write_text(text[: match.start(2)] + changed + text[match.end(2) :], encoding="utf-8")
    out = _render("--check", root=copy)
    assert out.returncode == 1
    assert "'quality-auroc'" in out.stderr and "BENCHMARKS.md" in out.stderr
    # Rendering repairs it; the check then passes.
    assert _render(root=copy).returncode == 0
    assert path.read_text(encoding="utf-8") == text
    assert _render("--check", root=copy).returncode == 0


def test_a_changed_result_fails_the_check(copy):
    path = copy / "benchmarks" / "results" / "ood_quality.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    result["summary"]["softmax_accuracy"][0] += 1.0
    path.write_text(json.dumps(result), encoding="utf-8")
    out = _render("--check", root=copy)
    assert out.returncode == 1
    assert "'readme-scores'" in out.stderr and "README.md" in out.stderr


def test_unknown_and_unclosed_blocks_are_reported(copy):
    path = copy / "README.md"
    text = path.read_text(encoding="utf-8")
    path.write_text(
        text + "\n<!-- render:no-such-table -->\nx\n<!-- /render:no-such-table -->\n"
        "<!-- render:quality-tnr -->\n",
        encoding="utf-8",
    )
    out = _render("--check", root=copy)
    assert out.returncode == 1
    assert "no renderer for block 'no-such-table'" in out.stderr
    assert "'quality-tnr' has no closing" in out.stderr


def test_a_missing_result_renders_as_not_measured(copy):
    (copy / "benchmarks" / "results" / "edge_latency.json").unlink()
    assert _render(root=copy).returncode == 0
    text = (copy / "BENCHMARKS.md").read_text(encoding="utf-8")
    body = text.split("<!-- render:edge-latency -->\n")[1].split("<!-- /render:edge-latency -->")[0]
    assert body.startswith("*Not measured yet: `benchmarks/results/edge_latency.json`")
