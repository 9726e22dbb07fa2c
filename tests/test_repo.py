"""Repository wiring: CI runs exactly README's test command; dependencies point one way."""

import re

from conftest import REPO_ROOT


def _bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme.split("## Quick start", 1)[1].split("\n## ", 1)[0])
    assert len(blocks) == 2, "README's quick start must hold exactly two commands: main job, tests"
    ci_lines = [ln.strip() for ln in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == blocks[1], "the last line of .ci/run must be README's test command"


def test_package_never_imports_torchvision():
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "segloss").rglob("*.py")
        if re.search(r"^\s*(import|from)\s+torchvision", path.read_text(), flags=re.M)
    ]
    assert not offenders, f"segloss must not require torchvision: {offenders}"


def test_losses_do_not_import_data_metrics_or_bundles():
    pattern = re.compile(r"^\s*(from|import)\s+segloss\.(data|metrics|transforms|engines)", flags=re.M)
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "segloss" / "losses").rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert not offenders, f"losses must not depend on data/metrics/transforms/engines: {offenders}"


def test_transforms_do_not_import_losses():
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "segloss" / "transforms").rglob("*.py")
        if re.search(r"^\s*(from|import)\s+segloss\.losses", path.read_text(), flags=re.M)
    ]
    assert not offenders, f"transforms must not import losses: {offenders}"
