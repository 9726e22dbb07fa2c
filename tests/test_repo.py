"""Repository wiring: CI runs exactly README's test command; dependencies point one way, checked on the imports
of every module (absolute imports only)."""

import ast
import importlib
import re

import pytest
from conftest import REPO_ROOT

MODULES = sorted(REPO_ROOT.joinpath("segloss").rglob("*.py"))


def _module_name(path):
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    """``(line, imported module, is_relative)`` of every import in ``path``, also those inside functions;
    ``from a import b`` yields ``a.b`` as well (``b`` may be a submodule)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.append((node.lineno, base, node.level > 0))
            found += [(node.lineno, f"{base}.{alias.name}", node.level > 0) for alias in node.names]
    return found


def _offenders(paths, forbidden):
    pattern = re.compile(rf"^({'|'.join(map(re.escape, forbidden))})(\.|$)")
    return [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for path in paths
        for line, name, _ in _imports(path)
        if pattern.match(name)
    ]


def test_every_module_is_checked_and_imports():
    names = {_module_name(p) for p in MODULES}
    assert {"segloss.losses.dice", "segloss.losses._fused", "segloss.engines", "segloss.transforms.array"} <= names
    for name in sorted(names):
        importlib.import_module(name)


def test_no_relative_imports():
    paths = [*MODULES, *REPO_ROOT.joinpath("tests").rglob("*.py"), *REPO_ROOT.joinpath("benchmarks").rglob("*.py")]
    offenders = [f"{p.relative_to(REPO_ROOT)}:{line}" for p in paths for line, _, rel in _imports(p) if rel]
    assert not offenders, f"use absolute imports (segloss.x.y): {sorted(set(offenders))}"


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("losses", ["segloss.data", "segloss.metrics", "segloss.transforms", "segloss.engines", "segloss.handlers"]),
        ("transforms", ["segloss.losses", "segloss.engines", "segloss.handlers"]),
        ("networks", ["segloss.losses", "segloss.data", "segloss.transforms", "segloss.engines"]),
    ],
)
def test_dependencies_point_one_way(package, forbidden):
    paths = [p for p in MODULES if p.is_relative_to(REPO_ROOT / "segloss" / package)]
    offenders = _offenders(paths, forbidden)
    assert not offenders, f"segloss.{package} must not depend on {forbidden}: {offenders}"


def test_package_never_imports_bundles_or_benchmarks():
    offenders = _offenders(MODULES, ["bundles", "benchmarks", "tests", "torchvision"])
    assert not offenders, offenders


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


def test_no_docstrings_assembled_at_import_and_no_private_aten_ops():
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {pattern}"
        for path in MODULES
        for pattern in (r"__doc__\s*\+=", r"torch\.ops\.aten\.")
        if re.search(pattern, path.read_text())
    ]
    assert not offenders, offenders
