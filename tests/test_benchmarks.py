"""The benchmark scripts stay runnable: every entry of benchmarks/losses.py builds and steps on a tiny case."""

import importlib.util
import sys

import pytest
from conftest import REPO_ROOT

from segloss.losses import set_fused_paths, set_input_checks
from segloss.losses.inputs import input_checks_enabled

BENCHMARKS = REPO_ROOT / "benchmarks"


def load_benchmark(name: str, script: str):
    """Import a script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def losses_benchmark():
    sys.path.insert(0, str(BENCHMARKS))  # the worker imports lovasz_reference from beside the script
    try:
        module = load_benchmark("losses_benchmark", "losses.py")
        module.CASES["tiny"] = (2, 3, (6, 5, 4))
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def entries():
    module = load_benchmark("losses_benchmark_list", "losses.py")
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


def test_paired_ratio_runs(losses_benchmark):
    result = losses_benchmark.paired_worker("dice", "tiny", pairs=4, threads=1, device="cpu")
    assert result["pairs"] == 4 and 0 < result["q1"] <= result["ratio"] <= result["q3"]


def test_paired_ratio_without_input_checks(losses_benchmark):
    try:
        result = losses_benchmark.paired_worker("dice", "tiny", pairs=2, threads=1, device="cpu", checks=False)
        assert not input_checks_enabled()  # the worker's process times segloss with the checks off
    finally:
        set_input_checks(True)
    assert result["pairs"] == 2 and result["ratio"] > 0


@pytest.fixture(scope="module")
def loss_study():
    return load_benchmark("loss_study", "loss_study.py")


def test_loss_study_trains_reports_and_resumes(loss_study, tmp_path, capsys):
    from segloss.data.synthetic import write_membrane_2d

    data = write_membrane_2d(tmp_path / "isbi", num=30, size=64)
    results, doc = tmp_path / "results" / "loss_study_tiny", tmp_path / "loss_study.md"
    losses = ["ce", "border_ce_dice", "dice_ce_skeleton_recall"]
    for name in losses:
        row = loss_study.train_one(name, 0, "tiny", data, results)
        assert row["steps"] == loss_study.BUDGETS["tiny"]["steps"] and 0 <= row["dice"] <= 1 and row["betti"] >= 0
    assert loss_study.pending(results, losses, [0, 1]) == [(name, 1) for name in losses]
    finished = {p: p.stat().st_mtime_ns for p in (results / "rows").glob("*.json")}

    args = ["--budget", "tiny", "--data", str(data), "--results", str(results), "--losses", *losses, "--seeds", "0"]
    loss_study.main([*args, "--doc", str(doc), "--figures", str(tmp_path / "figures")])
    assert "started" not in capsys.readouterr().out  # every run was finished: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in (results / "rows").glob("*.json")} == finished

    rows = (results.parent / "loss_study_tiny.csv").read_text().splitlines()
    assert rows[0].startswith("loss,seed,dice,cldice,betti0,betti1,betti,") and len(rows) == 1 + len(losses)
    text = doc.read_text()
    assert "<!-- table:tiny -->" in text and all(f"| {name} | 1 |" in text for name in losses)
    for kind in ("metrics", "curves", "overlays"):
        assert (tmp_path / "figures" / f"loss_study_tiny_{kind}.png").stat().st_size > 0


@pytest.fixture(scope="module")
def loss_study_3d():
    sys.path.insert(0, str(BENCHMARKS))  # it imports loss_study from beside it
    return load_benchmark("loss_study_3d", "loss_study_3d.py")


def test_loss_study_3d_trains_reports_and_resumes(loss_study_3d, tmp_path, capsys):
    results, doc = tmp_path / "results" / "loss_study_3d_tiny", tmp_path / "loss_study.md"
    losses = ["ce", "dice_ce_skeleton_recall", "dice_ce_topology_volume"]
    for name in losses:
        row = loss_study_3d.train_one(name, 0, "tiny", results)
        assert row["steps"] == loss_study_3d.BUDGETS["tiny"]["steps"] and 0 <= row["cldice"] <= 1
        assert row["betti"] == row["betti0"] + row["betti1"] + row["betti2"] >= 0
    data = loss_study_3d.volumes(loss_study_3d.BUDGETS["tiny"], results / "cache")
    assert data["train_label"].any() and (data["train_skeleton"] <= data["train_label"]).all()

    args = ["--budget", "tiny", "--results", str(results), "--losses", *losses, "--seeds", "0"]
    loss_study_3d.main([*args, "--doc", str(doc), "--figures", str(tmp_path / "figures")])
    assert "started" not in capsys.readouterr().out  # every run was finished: nothing is trained again
    rows = (results.parent / "loss_study_3d_tiny.csv").read_text().splitlines()
    assert rows[0].startswith("loss,seed,dice,cldice,betti0,betti1,betti2,betti,") and len(rows) == 1 + len(losses)
    assert "<!-- table:3d_tiny -->" in doc.read_text()
    for kind in ("metrics", "curves", "projections"):
        assert (tmp_path / "figures" / f"loss_study_3d_tiny_{kind}.png").stat().st_size > 0


def test_loss_study_timing_is_relative_to_ce(loss_study):
    timing = loss_study.time_steps("tiny", ["ce", "dice_ce"], repeats=1, steps=1)
    assert set(timing) == {"ce", "dice_ce"} and all(t > 0 for t in timing.values())


def test_topology_prior_cost_per_voxel_runs():
    topology = load_benchmark("topology_benchmark", "topology.py")
    rows = topology.prior_term_per_voxel(edges=(16, 24), warmup=0, repeats=1)
    assert [edge for edge, _ in rows] == [16, 24]
    assert all(0 < seconds < 1e-3 for _, seconds in rows)
