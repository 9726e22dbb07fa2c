"""Tversky / focal Tversky: parity with MONAI 1.6.1's TverskyLoss, float64 reference for FocalTverskyLoss."""

import monai.losses as ml
import pytest
import torch
import torch.nn.functional as F
from test_dice import SPATIAL, TOL, _one_thread, assert_same, make_data  # noqa: F401  (fixture re-used)

import segloss


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["binary", "labels", "onehot"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("ab", [(0.5, 0.5), (0.3, 0.7), (1.0, 0.2)])
def test_tversky_matches_monai(dim, kind, include_background, ab):
    x, y, ym, act = make_data(kind, SPATIAL[dim])
    for batch in (False, True):
        for reduction in ("mean", "sum", "none"):
            kw = dict(act, include_background=include_background, batch=batch, reduction=reduction)
            kw.update(alpha=ab[0], beta=ab[1])
            assert_same(segloss.TverskyLoss(**kw), ml.TverskyLoss(**kw), x, y, ym)


@pytest.mark.parametrize("ignore_index", [255, 2])
def test_tversky_ignore_index_and_soft_label_match_monai(ignore_index):
    x, lab, _, _ = make_data("labels", (6, 7), C=4)
    lab[:, :, :2] = ignore_index
    kw = dict(softmax=True, to_onehot_y=True, ignore_index=ignore_index, alpha=0.3, beta=0.7)
    assert_same(segloss.TverskyLoss(**kw), ml.TverskyLoss(**kw), x, lab, lab)
    x, onehot, _, _ = make_data("onehot", (6, 7))
    soft = onehot * 0.7 + 0.1
    kw = dict(softmax=True, soft_label=True, alpha=0.2, beta=0.8)
    assert_same(segloss.TverskyLoss(**kw), ml.TverskyLoss(**kw), x, soft, soft)


def naive_focal_tversky(x, lab, C, alpha, beta, gamma, *, wm, batch, empty, bg, ignore_index=255):
    """float64 (1 - TI)^gamma from the one-hot of ``lab``, voxel weights ``wm`` and an ignore label."""
    p = x.double().softmax(1)
    v = (lab != ignore_index).double() * wm.double()
    g = F.one_hot(torch.where(lab == ignore_index, 0, lab)[:, 0], C).movedim(-1, 1).double()
    dims = (0, *range(2, x.ndim)) if batch else tuple(range(2, x.ndim))
    tp = (v * p * g).sum(dims)
    fp = (v * p * (1 - g)).sum(dims)
    fn = (v * (1 - p) * g).sum(dims)
    P, G, count = (v * p).sum(dims), (v * g).sum(dims), v.sum(dims)
    f = (1 - (tp + 1e-5) / (tp + alpha * fp + beta * fn + 1e-5)) ** gamma
    if empty == "fp_rate":
        f = torch.where(G == 0, P / count, f)
    return f[..., 0 if bg else 1 :].mean()


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("empty", ["smooth", "fp_rate"])
@pytest.mark.parametrize("bg", [True, False])
@pytest.mark.parametrize("gamma", [0.75, 2.0])
def test_focal_tversky_matches_float64_reference(batch, empty, bg, gamma):
    x, lab, _, _ = make_data("labels", (5, 6, 4), C=4)
    lab[1, :, :1] = 255
    wm = torch.rand(2, 1, 5, 6, 4) + 0.5
    kw = dict(softmax=True, alpha=0.3, beta=0.7, gamma=gamma, batch=batch, empty_target=empty)
    x1, x2 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    got = segloss.FocalTverskyLoss(**kw, include_background=bg, ignore_index=255)(x1, lab, wm)
    ref = naive_focal_tversky(x2, lab, 4, 0.3, 0.7, gamma, wm=wm, batch=batch, empty=empty, bg=bg)
    torch.testing.assert_close(got.double(), ref, **TOL)
    (g1,) = torch.autograd.grad(got, x1)
    (g2,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(g1.double(), g2, **TOL)


def test_focal_tversky_gamma_one_is_tversky_and_defaults_follow_the_paper():
    x, lab, _, _ = make_data("labels", (6, 7))
    a = segloss.FocalTverskyLoss(softmax=True, gamma=1.0, reduction="none")(x, lab)
    b = segloss.TverskyLoss(softmax=True, alpha=0.3, beta=0.7, reduction="none")(x, lab)
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 3)  # MONAI's Tversky "none" shape (B, C)
    loss = segloss.FocalTverskyLoss()
    assert (loss.alpha, loss.beta, loss.gamma) == (0.3, 0.7, 0.75)


@pytest.mark.parametrize("gamma", [0.5, 0.75, 3.0])
def test_focal_tversky_perfect_prediction_is_zero_with_finite_gradient(gamma):
    lab = torch.randint(0, 3, (2, 1, 5, 5))
    x = (F.one_hot(lab[:, 0], 3).movedim(-1, 1).float() * 200 - 100).requires_grad_(True)  # saturated sigmoid
    loss = segloss.FocalTverskyLoss(sigmoid=True, gamma=gamma)(x, lab)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(g).all()


def test_tversky_bad_options():
    with pytest.raises(ValueError, match="alpha"):
        segloss.TverskyLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        segloss.FocalTverskyLoss(gamma=0.0)
    with pytest.raises(ValueError, match="sync_batch"):
        segloss.FocalTverskyLoss(sync_batch=True)
