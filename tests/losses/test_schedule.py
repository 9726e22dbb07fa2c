"""TermWeightSchedule: piecewise-linear / step weights per CompoundLoss term."""

import pytest
import torch

from segloss.losses import CompoundLoss, LovaszSoftmaxLoss, TermWeightSchedule, WeightedCrossEntropyLoss


def test_linear_interpolation_and_clamping():
    s = TermWeightSchedule({"ce": [(10, 1.0), (20, 0.0)], "lovasz": [[10, 0.0], [20, 1.0], [30, 0.5]]})
    assert s.weights(0) == {"ce": 1.0, "lovasz": 0.0}
    assert s.weights(15) == pytest.approx({"ce": 0.5, "lovasz": 0.5})
    assert s.weights(20) == {"ce": 0.0, "lovasz": 1.0}
    assert s.weights(25) == pytest.approx({"ce": 0.0, "lovasz": 0.75})
    assert s.weights(1000) == {"ce": 0.0, "lovasz": 0.5}


def test_step_mode():
    s = TermWeightSchedule({"ce": [(0, 1.0), (5, 0.2), (8, 0.0)]}, mode="step")
    assert [s.weights(t)["ce"] for t in (0, 4, 5, 7.9, 8, 50)] == [1.0, 1.0, 0.2, 0.2, 0.0, 0.0]


def test_apply_sets_compound_weights_and_skips_zero_terms():
    loss = CompoundLoss({"ce": WeightedCrossEntropyLoss(), "lovasz": LovaszSoftmaxLoss()})
    s = TermWeightSchedule({"ce": [(0, 1.0), (2, 0.0)], "lovasz": [(0, 0.0), (2, 1.0)]})
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    assert s.apply(loss, 0) == {"ce": 1.0, "lovasz": 0.0}
    torch.testing.assert_close(loss(x, y), WeightedCrossEntropyLoss()(x, y))
    assert set(loss.last_terms) == {"ce"}  # the Lovász term is not even computed during the warm-up
    s.apply(loss, 1)
    assert loss.weights == {"ce": 0.5, "lovasz": 0.5}
    s.apply(loss, 2)
    torch.testing.assert_close(loss(x, y), LovaszSoftmaxLoss()(x, y))
    with pytest.raises(KeyError, match="dice"):
        TermWeightSchedule({"dice": [(0, 1.0)]}).apply(loss, 0)


@pytest.mark.parametrize(
    "points, mode, match",
    [
        ({"ce": [(0, 1.0), (0, 2.0)]}, "linear", "increasing"),
        ({"ce": [(5, 1.0), (2, 2.0)]}, "linear", "increasing"),
        ({"ce": [(0, -1.0)]}, "linear", "weights"),
        ({"ce": [(0, float("nan"))]}, "linear", "weights"),
        ({"ce": []}, "linear", "points"),
        ({"ce": [(0, 1.0, 2.0)]}, "linear", "points"),
        ({}, "linear", "points"),
        ({"ce": [(0, 1.0)]}, "cosine", "mode"),
    ],
)
def test_bad_schedules(points, mode, match):
    with pytest.raises(ValueError, match=match):
        TermWeightSchedule(points, mode=mode)
