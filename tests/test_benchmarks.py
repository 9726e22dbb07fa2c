"""The benchmark scripts stay runnable: every entry of benchmarks/losses.py builds and steps on a tiny case."""

import importlib.util
import sys

import pytest
from conftest import REPO_ROOT

from segloss.losses import set_fused_paths

BENCHMARKS = REPO_ROOT / "benchmarks"


@pytest.fixture(scope="module")
def losses_benchmark():
    sys.path.insert(0, str(BENCHMARKS))  # the worker imports lovasz_reference from beside the script
    try:
        spec = importlib.util.spec_from_file_location("losses_benchmark", BENCHMARKS / "losses.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.CASES["tiny"] = (2, 3, (6, 5, 4))
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def entries():
    spec = importlib.util.spec_from_file_location("losses_benchmark_list", BENCHMARKS / "losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = [("cross_entropy", "torch")]
    out += [
        (name, impl)
        for name, (_, monai_src) in module.LOSSES.items()
        for impl in ("segloss", "monai")[: 1 + bool(monai_src)]
    ]
    out += [(name, "plain") for name in module.LOSSES]
    out += [(name, impl) for name, impls in module.LOVASZ.items() for impl in impls]
    return out


@pytest.mark.parametrize("name, impl", entries())
def test_every_benchmark_entry_runs(losses_benchmark, name, impl):
    try:
        result = losses_benchmark.worker(name, impl, "tiny", repeats=1, threads=1, device="cpu")
    finally:
        set_fused_paths(True)  # the "plain" worker switches the fused paths off (in its own process, normally)
    assert result["ms"] > 0 and result["peak_mb"] == result["peak_mb"]
