"""Every ```python block in docs/*.md runs.

The blocks of one page run in order in one namespace (later examples reuse earlier names). A block of ``>>>``
lines is a doctest: its outputs are checked. A block directly preceded by ``<!-- skip -->`` is only compiled, not
run (e.g. examples that need the ImageNet VGG-19 weights or a GPU).
"""

import doctest
import re
import warnings
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
SKIP_MARK = "<!-- skip -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` of each fenced python block of a Markdown page."""
    blocks = []
    for m in FENCE.finditer(text):
        skipped = text[: m.start()].rstrip().endswith(SKIP_MARK)
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1), skipped))
    return blocks


PAGES = sorted(DOCS.glob("*.md"))


def test_block_extraction():
    text = "a\n<!-- skip -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n```bash\nz\n```\n"
    assert python_blocks(text) == [(4, "x = 1\n", True), (8, "y = 2\n", False)]


def test_pages_exist():
    names = {p.name for p in PAGES}
    assert {"index.md", "losses.md", "transforms.md", "metrics.md"} <= names
    losses = (DOCS / "losses.md").read_text()
    # the Dice-family and Lovász sections are anchored by these markers
    assert "<!-- dice-family -->" in losses and "<!-- lovasz -->" in losses


def run_doctest_block(code: str, namespace: dict, name: str) -> str:
    """Run a block of ``>>>`` examples in ``namespace``; the report of the failed ones ('' when all pass)."""
    test = doctest.DocTestParser().get_doctest(code, namespace, name, None, 0)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append, clear_globs=False)
    return "".join(report)


def test_doctest_blocks_check_their_output():
    assert run_doctest_block(">>> x = 2\n>>> x * 3\n6\n", {}, "good") == ""
    assert "Expected" in run_doctest_block(">>> 2 * 3\n7\n", {}, "bad")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page: Path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # examples must not write into the repository
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    torch.manual_seed(0)
    for line, code, skipped in python_blocks(page.read_text()):
        if code.lstrip().startswith(">>>"):
            if not skipped:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    failures = run_doctest_block(code, namespace, f"{page.name}:{line}")
                assert not failures, f"doctest at {page.name} line {line} failed:\n{failures}"
            continue
        compiled = compile(code, f"{page.name}:{line}", "exec")  # skipped blocks must at least parse
        if skipped:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(compiled, namespace)
            except Exception as e:
                raise AssertionError(f"example at {page.name} line {line} failed: {type(e).__name__}: {e}") from e
