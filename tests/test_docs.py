"""Every ```python block in docs/*.md runs.

The blocks of one page run in order in one namespace (later examples reuse earlier names). A block directly
preceded by ``<!-- skip -->`` is only compiled, not run (e.g. examples that need the ImageNet VGG-19 weights or
a GPU).
"""

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


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page: Path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # examples must not write into the repository
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    torch.manual_seed(0)
    for line, code, skipped in python_blocks(page.read_text()):
        compiled = compile(code, f"{page.name}:{line}", "exec")  # skipped blocks must at least parse
        if skipped:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(compiled, namespace)
            except Exception as e:
                raise AssertionError(f"example at {page.name} line {line} failed: {type(e).__name__}: {e}") from e
