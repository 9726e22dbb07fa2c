"""The ``>>>`` examples in the docstrings of every segloss module run and print what they show."""

import doctest
import importlib
import pkgutil
import warnings

import pytest
import torch

import segloss

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(segloss.__path__, prefix="segloss.")
    if name != "segloss.demo"  # a script (its main() parses the command line); it has no examples
)
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    # module=... keeps the tests of objects defined in this module, not of the ones it re-exports
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module=module)
    return [t for t in tests if t.examples]


def test_finder_runs_and_checks_examples():
    """A docstring example with a wrong expected output fails: the runner below is not vacuous."""
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=OPTIONS, verbose=False)
    good = parser.get_doctest(">>> 1 + 1\n2\n", {}, "good", None, 0)
    bad = parser.get_doctest(">>> 1 + 1\n3\n", {}, "bad", None, 0)
    assert runner.run(good, out=lambda s: None).failed == 0
    assert runner.run(bad, out=lambda s: None).failed == 1


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # examples must not write into the repository
    torch.manual_seed(0)
    report = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for test in _examples(module_name):
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
