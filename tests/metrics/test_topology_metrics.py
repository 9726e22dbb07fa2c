"""Topology metrics: known Betti numbers / clDice / delineation values on constructed shapes, MONAI conventions."""

import itertools

import numpy as np
import pytest
import torch
from metric_shapes import BALL, CUT_RING, HOLLOW_SPHERE, RING, SOLID_TORUS, TWO_DISCS, N, line, onehot
from monai.metrics import DiceMetric
from skimage.measure import euler_number
from skimage.morphology import skeletonize

from segloss.metrics import (
    BettiNumberError,
    ClDiceMetric,
    DelineationMetric,
    betti_number_error,
    betti_numbers,
    cldice,
    delineation_scores,
)

# ---- Betti numbers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [None, 1])
@pytest.mark.parametrize(
    "mask, expected",
    [
        (RING, [1, 1]),
        (CUT_RING, [1, 0]),
        (TWO_DISCS, [2, 0]),
        (HOLLOW_SPHERE, [1, 0, 1]),
        (SOLID_TORUS, [1, 1, 0]),
        (BALL, [1, 0, 0]),
    ],
)
def test_betti_numbers_known_shapes(mask, expected, connectivity):
    assert betti_numbers(mask, connectivity).tolist() == expected


def test_betti_connectivity_diagonal():
    # two diagonal pixels: one component with 8-connectivity, two with 4; a diagonal "ring" only closes with 8
    diag = np.eye(3, dtype=bool)
    assert betti_numbers(diag).tolist() == [1, 0]
    assert betti_numbers(diag, connectivity=1).tolist() == [3, 0]
    diamond = np.zeros((5, 5), dtype=bool)
    diamond[[1, 2, 2, 3], [2, 1, 3, 2]] = True
    assert betti_numbers(diamond).tolist() == [1, 1]  # 8-connected loop around a 4-connected hole
    assert betti_numbers(diamond, connectivity=1).tolist() == [4, 0]  # 4 pixels; hole leaks diagonally (8-bg)


@pytest.mark.parametrize("connectivity", [None, 1])
def test_betti_euler_consistency_random(connectivity):
    # dual connectivity pairs make chi = b0 - b1 (2D, holes counted independently of chi) and b1 >= 0 in 3D
    rng = np.random.default_rng(0)
    for _ in range(20):
        m2 = rng.random((12, 12)) < 0.5
        b = betti_numbers(m2, connectivity)
        assert b[0] - b[1] == euler_number(m2, connectivity=connectivity or 2)
        m3 = rng.random((7, 7, 7)) < 0.5
        b = betti_numbers(m3, connectivity)
        assert b.min() >= 0
        assert b[0] - b[1] + b[2] == euler_number(m3, connectivity=connectivity or 3)


def test_betti_errors_between_shapes():
    assert betti_number_error(RING, CUT_RING).tolist() == [0, 1]
    assert betti_number_error(RING, TWO_DISCS).tolist() == [1, 1]
    assert betti_number_error(HOLLOW_SPHERE, SOLID_TORUS).tolist() == [0, 1, 1]
    assert betti_number_error(SOLID_TORUS, BALL).tolist() == [0, 1, 0]


def test_betti_metric_shapes_and_reductions():
    y_pred = torch.cat([onehot(RING), onehot(CUT_RING)])  # (2, 2, N, N)
    y = torch.cat([onehot(CUT_RING), onehot(TWO_DISCS)])
    per_dim = BettiNumberError(per_dimension=True, reduction="none")(y_pred, y)
    assert per_dim.shape == (2, 1, 2) and per_dim.dtype == torch.float32
    assert per_dim[:, 0].tolist() == [[0, 1], [1, 0]]
    summed = BettiNumberError()
    assert summed(y_pred, y).tolist() == [[1.0], [1.0]]
    assert summed.aggregate().item() == 1.0
    # include_background: channel 0 is the complement; its beta0 counts the outside plus the ring's hole
    with_bg = BettiNumberError(include_background=True, per_dimension=True, reduction="none")(y_pred[:1], y[:1])
    assert with_bg.shape == (1, 2, 2)
    assert with_bg[0, 0].tolist() == betti_number_error(~RING, ~CUT_RING).tolist() == [1, 0]
    m = BettiNumberError(per_dimension=True, reduction="mean_channel")
    m(y_pred, y)
    assert m.aggregate().tolist() == [[0, 1], [1, 0]]
    # 3D rows have K = 3
    y3 = onehot(HOLLOW_SPHERE)
    m3 = BettiNumberError(per_dimension=True)
    assert m3(onehot(SOLID_TORUS), y3).tolist() == [[[0, 1, 1]]]
    assert m3.aggregate().tolist() == [0, 1, 1]


# ---- clDice -------------------------------------------------------------------------------------------------------


def test_cldice_identical_and_cut_line_by_hand():
    full, cut = line(20), line(20, gap=(9, 10))
    assert cldice(full, full) == 1.0
    assert cldice(RING, RING) == 1.0
    # a 1-px line is its own skeleton: Tprec = |S(P) & L| / |S(P)| = 18/18, Tsens = |S(L) & P| / |S(L)| = 18/20
    tprec, tsens = 18 / 18, 18 / 20
    assert cldice(cut, full) == pytest.approx(2 * tprec * tsens / (tprec + tsens))  # 18/19
    assert cldice(line(20, row=3), full) == 0.0  # disjoint lines
    # prediction = cut line + a 5-px spur (a T of 1-px lines, its own skeleton): Tprec = 18/23, Tsens = 18/20
    spur = cut.copy()
    spur[N // 2 - 5 : N // 2, 12] = True
    assert (skeletonize(spur) == spur).all()
    tprec, tsens = 18 / 23, 18 / 20
    assert cldice(spur, full) == pytest.approx(2 * tprec * tsens / (tprec + tsens))


def test_cldice_3d_tiny_blob_counts():
    # Lee's 3D skeleton removes a 2x2x2 cube entirely; the mask is then its own skeleton, so it still scores
    blob = np.zeros((6, 6, 6), dtype=bool)
    blob[2:4, 2:4, 2:4] = True
    assert cldice(blob, blob) == 1.0
    assert cldice(SOLID_TORUS, SOLID_TORUS) == 1.0


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_cldice_empty_cases_match_monai_dice(ignore_empty):
    e, f = np.zeros((N, N), bool), RING
    y_pred = torch.cat([onehot(a, b) for a, b in [(e, e), (f, e), (e, f)]])  # channel 1 / 2 pred
    y = torch.cat([onehot(a, b) for a, b in [(e, f), (e, e), (f, e)]])
    # rows per (sample, class): (e vs e), (e vs f), (f vs e), (e vs e), (e vs f), (f vs e)
    kw = dict(include_background=False, reduction="mean", get_not_nans=True, ignore_empty=ignore_empty)
    ours, dice = ClDiceMetric(**kw), DiceMetric(**kw)
    ours(y_pred, y), dice(y_pred, y)
    torch.testing.assert_close(ours.get_buffer(), dice.get_buffer(), equal_nan=True)
    for a, b in zip(ours.aggregate(), dice.aggregate()):
        torch.testing.assert_close(a, b)


def test_cldice_metric_list_input_and_batch():
    y_pred = torch.cat([onehot(line(20, gap=(9, 10)), RING), onehot(line(20), RING)])
    y = torch.cat([onehot(line(20), RING), onehot(line(20), CUT_RING)])
    m = ClDiceMetric(reduction="none")
    batched = m(y_pred, y)
    assert batched.shape == (2, 2)
    assert batched[0].tolist() == pytest.approx([18 / 19, 1.0])
    assert batched[1, 1].item() == pytest.approx(cldice(RING, CUT_RING))
    listed = ClDiceMetric(reduction="none")(list(y_pred), list(y))  # decollated channel-first tensors
    torch.testing.assert_close(listed, batched)
    m2 = ClDiceMetric(reduction="mean_batch")
    m2(y_pred, y)
    torch.testing.assert_close(m2.aggregate(), batched.mean(0))


# ---- delineation --------------------------------------------------------------------------------------------------


def naive_delineation(p, t, tol):
    """float64 brute force on centreline pixel sets (no skeletonisation)."""
    pp, tt = np.argwhere(p).astype(np.float64), np.argwhere(t).astype(np.float64)
    d = np.sqrt(((pp[:, None] - tt[None]) ** 2).sum(-1))
    tp = (d.min(1) <= tol).sum()
    fn = (d.min(0) > tol).sum()
    return [(len(tt) - fn) / len(tt), tp / len(pp), tp / (len(pp) + fn)]


@pytest.mark.parametrize("shift, expected", [(0, 1.0), (1, 1.0), (2, 1.0), (5, 0.0)])
def test_delineation_shifted_line(shift, expected):
    got = delineation_scores(line(20, row=10 + shift), line(20, row=10), tolerance=2.0)
    assert got.tolist() == [expected] * 3


def test_delineation_gap_by_hand():
    full = line(20)
    # gap of 4 px, tolerance 1 (inclusive): 2 gap pixels lie 1 px from the prediction -> 18/20 of L matched
    got = delineation_scores(line(20, gap=(8, 9, 10, 11)), full, tolerance=1.0)
    np.testing.assert_allclose(got, [18 / 20, 1.0, 16 / (16 + 0 + 2)])
    got = delineation_scores(line(20, gap=(8, 9, 10, 11)), full, tolerance=0.0)
    np.testing.assert_allclose(got, [16 / 20, 1.0, 16 / 20])


def test_delineation_matches_naive_random():
    rng = np.random.default_rng(1)
    for shape, tol in itertools.product([(20, 20), (8, 9, 10)], [0.0, 1.0, 1.5, 3.0]):
        p, t = rng.random(shape) < 0.05, rng.random(shape) < 0.05
        got = delineation_scores(p, t, tolerance=tol, skeletonize_inputs=False)
        np.testing.assert_allclose(got, naive_delineation(p, t, tol), rtol=1e-12)


def test_delineation_metric_shapes_and_empty():
    e = np.zeros((N, N), bool)
    y_pred = torch.cat([onehot(line(20, row=N // 2 + 1), e), onehot(line(20), RING)])
    y = torch.cat([onehot(line(20), e), onehot(line(20, row=N // 2 + 5), RING)])
    rows = DelineationMetric(reduction="none")(y_pred, y)
    assert rows.shape == (2, 2, 3)
    assert rows[0, 0].tolist() == [1.0, 1.0, 1.0]  # 1 px apart
    assert torch.isnan(rows[0, 1]).all()  # empty target, ignore_empty
    assert rows[1, 0].tolist() == [0.0, 0.0, 0.0]  # 5 px apart
    assert rows[1, 1].tolist() == [1.0, 1.0, 1.0]
    m = DelineationMetric(reduction="mean", get_not_nans=True)
    m(y_pred, y)
    mean, not_nans = m.aggregate()
    assert mean.shape == (3,) and not_nans.tolist() == [2.0, 2.0, 2.0]
    # MONAI's two-step mean: per sample over non-NaN classes (1 and (0 + 1) / 2), then over samples
    torch.testing.assert_close(mean, torch.tensor([0.75] * 3))
    both_empty = DelineationMetric(reduction="none", ignore_empty=False)(y_pred[:1], y[:1])
    assert both_empty[0, 1].tolist() == [1.0, 1.0, 1.0]
    # 3D: identical torus, skeletonised by Lee
    assert DelineationMetric()(onehot(SOLID_TORUS), onehot(SOLID_TORUS)).tolist() == [[[1.0, 1.0, 1.0]]]


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [BettiNumberError(), ClDiceMetric(), DelineationMetric()])
def test_bad_input(metric):
    y = onehot(RING)
    with pytest.raises(ValueError, match="^y must have the shape of y_pred"):
        metric(y, onehot(RING, TWO_DISCS))
    with pytest.raises(ValueError, match="^y_pred must be binarised"):
        metric(y * 0.5, y)
    with pytest.raises(ValueError, match="^y must be binarised"):
        metric(y, torch.full_like(y, float("nan")))
    with pytest.raises(ValueError, match=r"^y_pred must be \(B, C, H, W\)"):
        metric(y[0], y[0])  # (C, H, W): no batch dimension
    with pytest.raises(ValueError, match="^y must be a torch.Tensor"):
        metric._compute_tensor(y, y.numpy())


def test_bad_options():
    with pytest.raises(ValueError, match="connectivity"):
        BettiNumberError(connectivity=4)
    with pytest.raises(ValueError, match="connectivity"):
        BettiNumberError(connectivity=2)(onehot(SOLID_TORUS), onehot(SOLID_TORUS))  # 2 is not a 3D dual pair
    with pytest.raises(ValueError, match="tolerance"):
        DelineationMetric(tolerance=-1.0)
    with pytest.raises(ValueError, match="tolerance"):
        DelineationMetric(tolerance=float("nan"))
