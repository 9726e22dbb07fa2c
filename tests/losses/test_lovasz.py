"""Lovász-Softmax / Lovász hinge against the float64 textbook loops of ``benchmarks/lovasz_reference.py`` (Alg. 1 of
Berman et al., CVPR 2018: per image / per class loops, compacted ignored voxels, sorted errors, Jaccard increments),
gradcheck of the custom backward, conventions, and kornia parity."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segloss.losses import CompoundLoss, LovaszHingeLoss, LovaszSoftmaxLoss, WeightedCrossEntropyLoss
from segloss.losses.lovasz import _LovaszExtension, lovasz_softmax
from segloss.losses.lovasz_hinge import lovasz_hinge

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from lovasz_reference import lovasz_hinge_loop, lovasz_softmax_loop  # noqa: E402

SHAPES = {"2d": (6, 7), "3d": (3, 4, 5)}


def one_hot(lab, C):
    return F.one_hot(lab, C).movedim(-1, 1).double()


def softmax_case(B=3, C=4, spatial=(6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    lab = torch.randint(0, C, (B, *spatial), generator=g)
    lab[1][lab[1] == 2] = 1  # class 2 absent from image 1
    return x, lab


def ours(fn, x, target, **kw):
    xs = x.float().requires_grad_()
    out = fn(xs, target, **kw)
    out.sum().backward()
    return out, xs.grad


def ref_softmax(x, lab, valid=None, **kw):
    xd = x.clone().requires_grad_()
    valid = torch.ones_like(lab, dtype=torch.bool) if valid is None else valid
    out = lovasz_softmax_loop(xd.softmax(1), one_hot(lab.clamp(0, x.shape[1] - 1), x.shape[1]), valid, **kw)
    out.backward()
    return out, xd.grad


def assert_matches(a, b):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va.double().sum(), vb, rtol=0, atol=1e-6)
    torch.testing.assert_close(ga.double(), gb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dims", list(SHAPES))
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all", [3, 1], [2, 0, 3, 1]])
@pytest.mark.parametrize("kind", ["labels", "onehot"])
def test_softmax_matches_reference(dims, per_image, classes, kind):
    x, lab = softmax_case(spatial=SHAPES[dims])
    target = lab.unsqueeze(1) if kind == "labels" else one_hot(lab, 4).float()
    got = ours(lovasz_softmax, x, target, classes=classes, per_image=per_image)
    assert_matches(got, ref_softmax(x, lab, classes=classes, per_image=per_image))


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_softmax_ignore_weight_background(per_image, include_background, classes):
    x, lab = softmax_case(spatial=SHAPES["3d"], seed=1)
    lab[0, 0] = 255
    lab[2] = 255  # image 2 entirely ignored
    valid = lab != 255
    start = 0 if include_background else 1
    weight = [0.5, 1.0, 2.0, 3.0][start:]
    kw = dict(classes=classes, per_image=per_image)
    got = ours(lovasz_softmax, x, lab, ignore_index=255, weight=weight, include_background=include_background, **kw)
    assert_matches(got, ref_softmax(x, lab, valid, weight=weight, start=start, **kw))
    assert torch.all(got[1][2] == 0)  # the ignored image gets no gradient


def test_softmax_dense_ignore_sentinel_and_soft_target():
    x, lab = softmax_case(spatial=SHAPES["2d"], seed=2)
    oh = one_hot(lab, 4).float()
    oh[:, :, 0, :3] = 255  # sentinel on every channel of these voxels
    got = ours(lovasz_softmax, x, oh, ignore_index=255, per_image=True)
    assert_matches(got, ref_softmax(x, lab, (oh[:, 0] != 255), per_image=True))
    # soft targets run the float path; on a hard target given as floats it equals the label path
    soft = one_hot(lab, 4).float()
    soft[0, :, 0, 0] = torch.tensor([0.25, 0.25, 0.5, 0.0])
    xd = x.clone().requires_grad_()
    ref = lovasz_softmax_loop(xd.softmax(1), soft.double(), torch.ones_like(lab, dtype=torch.bool))
    ref.backward()
    assert_matches(ours(lovasz_softmax, x, soft), (ref, xd.grad))


@pytest.mark.parametrize("per_image", [False, True])
def test_long_rows_take_the_radix_path(per_image):
    # long rows (>= 32768 voxels, where torch's CPU sort changes algorithm)
    x, lab = softmax_case(B=2, C=3, spatial=(128, 130), seed=3)
    lab[0, :5] = 255
    got = ours(lovasz_softmax, x, lab, per_image=per_image, ignore_index=255)
    assert_matches(got, ref_softmax(x, lab, lab != 255, per_image=per_image))


def test_ties_and_ignored_voxels_are_exact():
    # probabilities on a coarse grid: many equal errors, including errors of 0 next to ignored voxels
    B, C = 2, 3
    lab = torch.randint(0, C, (B, 9, 9))
    p = torch.randint(0, 3, (B, C, 9, 9)).double()
    p[:, 0] += 0.5
    p = p / p.sum(1, keepdim=True)
    p = torch.where(one_hot(lab, C) > 0, torch.where(torch.rand(B, 1, 9, 9) < 0.3, 1.0, p), p)
    p = p / p.sum(1, keepdim=True)
    lab[:, :2] = 255
    valid = lab != 255
    for per_image in (False, True):
        for classes in ("present", "all"):
            kw = dict(classes=classes, per_image=per_image)
            out = lovasz_softmax(p.float(), lab, softmax=False, ignore_index=255, **kw)
            ref = lovasz_softmax_loop(p, one_hot(lab.clamp(0, C - 1), C), valid, **kw)
            torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("dims", list(SHAPES))
def test_hinge_binary_matches_reference(per_image, dims):
    g = torch.Generator().manual_seed(4)
    x = 2 * torch.randn(3, 1, *SHAPES[dims], generator=g, dtype=torch.float64)
    mask = torch.rand(3, *SHAPES[dims], generator=g) > 0.6
    mask[2] = False  # an image without foreground still counts
    xd = x.clone().requires_grad_()
    ref = lovasz_hinge_loop(xd, mask.unsqueeze(1).double(), torch.ones_like(x, dtype=torch.bool), per_image=per_image)
    ref.backward()
    for target in (mask, mask.unsqueeze(1).float()):  # (B, *) and (B, 1, *)
        assert_matches(ours(lovasz_hinge, x, target, per_image=per_image), (ref, xd.grad))


@pytest.mark.parametrize("per_image", [False, True])
def test_hinge_multilabel_per_channel_with_ignore(per_image):
    g = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(2, 3, 8, 9, generator=g, dtype=torch.float64)
    gt = (torch.rand(2, 3, 8, 9, generator=g) > 0.5).float()
    gt[0, 1, :4] = 255  # element-wise ignore on one channel
    gt[1, 2] = 255  # a channel of an image fully ignored: left out of that image's mean
    valid = gt != 255
    xd = x.clone().requires_grad_()
    ref = lovasz_hinge_loop(xd, gt.double() * valid, valid, per_image=per_image)
    ref.backward()
    assert_matches(ours(lovasz_hinge, x, gt, per_image=per_image, ignore_index=255), (ref, xd.grad))
    # not one lumped hinge: differs from the binary loss of the channels flattened together
    lumped = lovasz_hinge(x.float().reshape(2, 1, -1), (gt * valid).reshape(2, 1, -1))
    assert abs(float(lumped) - float(ref.detach())) > 1e-3


def test_hinge_label_map_is_one_vs_rest():
    x, lab = softmax_case(spatial=SHAPES["2d"], seed=6)
    a = lovasz_hinge(x.float(), lab.unsqueeze(1), per_image=True)
    b = lovasz_hinge(x.float(), one_hot(lab, 4).float(), per_image=True)
    torch.testing.assert_close(a, b)


def test_gradcheck_extension():
    g = torch.Generator().manual_seed(7)
    e = torch.rand(2, 3, 11, generator=g, dtype=torch.float64).requires_grad_()
    hard = torch.rand(2, 3, 11, generator=g) > 0.5
    hard[0, 1] = False  # a row without ground truth
    soft = torch.rand(2, 3, 11, generator=g, dtype=torch.float64)
    valid = torch.rand(2, 1, 11, generator=g) > 0.3
    for gt, v in [(hard, None), (hard & valid, valid), (soft, None), (soft * valid, valid)]:
        assert torch.autograd.gradcheck(lambda e, gt=gt, v=v: _LovaszExtension.apply(e, gt, v)[0], (e,))


def test_perfect_prediction_is_zero():
    x, lab = softmax_case(spatial=SHAPES["3d"])
    logits = 50.0 * one_hot(lab, 4).float()
    for per_image in (False, True):
        assert float(lovasz_softmax(logits, lab, per_image=per_image, classes="all")) < 1e-12
    mask = lab == 1
    assert float(lovasz_hinge(4.0 * mask.float().unsqueeze(1) - 2.0, mask)) == 0.0


def test_absent_class_contributes_nothing_with_present():
    x, lab = softmax_case(spatial=SHAPES["2d"])
    lab[lab == 3] = 0  # class 3 absent everywhere
    present = lovasz_softmax(x.float(), lab, classes="present")
    torch.testing.assert_close(present, lovasz_softmax(x.float(), lab, classes=[0, 1, 2]))
    assert not torch.allclose(present, lovasz_softmax(x.float(), lab, classes="all"))
    # per image: class 2 is absent from image 1 only
    per = lovasz_softmax(x.float(), lab, classes="present", per_image=True, reduction="none")
    torch.testing.assert_close(per[1], lovasz_softmax(x[1:2].float(), lab[1:2], classes=[0, 1]))


@pytest.mark.parametrize("fn", [lovasz_softmax, lovasz_hinge])
def test_fully_ignored_images(fn):
    x, lab = softmax_case(spatial=SHAPES["2d"])
    lab[1] = 255
    xs = x.float().requires_grad_()
    out = fn(xs, lab, per_image=True, ignore_index=255)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(xs.grad).all() and (xs.grad[1] == 0).all()
    keep = [0, 2]
    torch.testing.assert_close(out, fn(x[keep].float(), lab[keep], per_image=True))
    lab[:] = 255
    for per_image in (False, True):
        xs.grad = None
        out = fn(xs, lab, per_image=per_image, ignore_index=255)
        out.backward()
        assert float(out.detach()) == 0.0 and (xs.grad == 0).all()


def test_reductions():
    x, lab = softmax_case(spatial=SHAPES["2d"])
    none = lovasz_softmax(x.float(), lab, per_image=True, reduction="none")
    assert none.shape == (3,)
    torch.testing.assert_close(none.mean(), lovasz_softmax(x.float(), lab, per_image=True))
    torch.testing.assert_close(none.sum(), lovasz_softmax(x.float(), lab, per_image=True, reduction="sum"))
    assert lovasz_softmax(x.float(), lab, reduction="none").shape == (1,)
    assert LovaszHingeLoss(per_image=True, reduction="none")(x.float(), lab).shape == (3,)


def test_class_weight_normalised_over_classes_used():
    x, lab = softmax_case(spatial=SHAPES["2d"])
    base = lovasz_softmax(x.float(), lab)
    torch.testing.assert_close(lovasz_softmax(x.float(), lab, weight=2.0), base)  # uniform weights change nothing


def test_module_compound_and_autocast():
    x, lab = softmax_case(spatial=SHAPES["3d"])
    loss = LovaszSoftmaxLoss(per_image=True, ignore_index=255, weight=[1, 1, 2, 2])
    torch.testing.assert_close(
        loss(x.float(), lab.unsqueeze(1)), lovasz_softmax(x.float(), lab, per_image=True, weight=[1, 1, 2, 2])
    )
    compound = CompoundLoss(
        {"ce": WeightedCrossEntropyLoss(), "lovasz": LovaszSoftmaxLoss()}, {"ce": 1.0, "lovasz": 0.5}
    )
    xs = x.float().requires_grad_()
    compound(xs, lab.unsqueeze(1)).backward()
    assert set(compound.last_terms) == {"ce", "lovasz"} and torch.isfinite(xs.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x.bfloat16(), lab.unsqueeze(1))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_sigmoid_binary_and_activation_defaults():
    x = torch.randn(2, 1, 6, 7)
    mask = torch.rand(2, 6, 7) > 0.5
    out = lovasz_softmax(x, mask, sigmoid=True)
    ref = lovasz_softmax_loop(x.double().sigmoid(), mask.unsqueeze(1).double(), torch.ones_like(mask))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    p = torch.rand(2, 3, 5, 5)
    lab = torch.randint(0, 3, (2, 5, 5))
    torch.testing.assert_close(lovasz_softmax(p, lab, softmax=False), lovasz_softmax(p, lab, other_act=lambda t: t))


def test_kornia_parity():
    kornia = pytest.importorskip("kornia")
    x, lab = softmax_case(spatial=(16, 17))
    expected = kornia.losses.lovasz_softmax_loss(x.float(), lab)
    torch.testing.assert_close(lovasz_softmax(x.float(), lab, per_image=True, classes="all"), expected)
    mask = (lab == 1).float()
    expected = kornia.losses.lovasz_hinge_loss(x[:, :1].float(), mask)
    torch.testing.assert_close(lovasz_hinge(x[:, :1].float(), mask, per_image=True), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(classes="bogus"), "classes"),
        (dict(classes=[4]), "classes"),
        (dict(classes=[0, 1], include_background=False), "classes"),
        (dict(weight=[1.0, 2.0]), "weight"),
        (dict(weight=[1.0, -1.0, 1.0, 1.0]), "weight"),
        (dict(reduction="avg"), "reduction"),
        (dict(sigmoid=True, softmax=True), "Incompatible"),
    ],
)
def test_bad_arguments(kwargs, match):
    x, lab = softmax_case(spatial=SHAPES["2d"])
    with pytest.raises(ValueError, match=match):
        lovasz_softmax(x.float(), lab, **kwargs)


def test_bad_inputs():
    x, lab = softmax_case(spatial=SHAPES["2d"])
    bad = x.float().clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input"):
        lovasz_softmax(bad, lab)
    with pytest.raises(ValueError, match="target"):
        lovasz_softmax(x.float(), lab + 4)
    with pytest.raises(ValueError, match="target"):
        lovasz_hinge(x[:, :1].float(), (lab == 1).float() * 2)
    with pytest.raises(ValueError, match="classes"):
        LovaszSoftmaxLoss(classes="some")
    with pytest.raises(ValueError, match="reduction"):
        LovaszHingeLoss(reduction="avg")


# --- tolerance: the binned approximation -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("tolerance", [0.3, 1e-2, 1e-3])
def test_binned_softmax_within_tolerance_of_exact(seed, per_image, tolerance):
    x, lab = softmax_case(B=2, C=4, spatial=(9, 8, 7) if seed % 2 else (30, 31), seed=seed)
    x = x * (1 + seed)  # sharper softmax: errors crowd near 0 and 1
    lab[0, :2] = 255
    kw = dict(per_image=per_image, ignore_index=255, classes="all" if seed % 3 else "present")
    exact = lovasz_softmax(x.float(), lab, **kw)
    approx = lovasz_softmax(x.float(), lab, tolerance=tolerance, **kw)
    assert abs(float(approx) - float(exact)) <= tolerance * (1 + 1e-5)
    if tolerance == 0.3:  # few bins: the approximation is visible, so the test can tell the two paths apart
        assert float(approx) != float(exact)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tolerance", [0.5, 1e-2])
def test_binned_hinge_within_tolerance_of_exact(seed, tolerance):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(2, 3, 12, 11, generator=g)
    target = (torch.rand(2, 3, 12, 11, generator=g) < 0.3).float()
    for per_image in (False, True):
        exact = lovasz_hinge(x, target, per_image=per_image)
        approx = lovasz_hinge(x, target, per_image=per_image, tolerance=tolerance)
        assert abs(float(approx) - float(exact)) <= tolerance * (1 + 1e-5)


def test_binned_bound_on_random_rows():
    """The bound of ``_binned_increments`` per row, on adversarial rows: tied errors, errors in few clusters, rows
    without foreground or without background, ignored voxels."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        R, N = int(torch.randint(1, 5, (), generator=g)), int(torch.randint(1, 300, (), generator=g))
        e = torch.rand(R, N, generator=g, dtype=torch.float64) ** float(4 * torch.rand((), generator=g))
        e = e * float(5 * torch.rand((), generator=g))
        if trial % 3 == 0:
            e = (e * 8).round() / 8
        fg = torch.rand(R, N, generator=g) < [0.0, 1.0, 0.3, 0.9][trial % 4]
        valid = torch.rand(R, N, generator=g) < 0.8 if trial % 2 else None
        fg = fg if valid is None else fg & valid
        tolerance = float(10 ** (-2.5 * torch.rand((), generator=g)))
        exact, total = _LovaszExtension.apply(e, fg, valid)
        approx, total_binned = _LovaszExtension.apply(e, fg, valid, tolerance)
        assert float((approx - exact).abs().max()) <= tolerance * (1 + 1e-9)
        assert torch.equal(total, total_binned)


def test_binned_equals_exact_when_every_voxel_has_its_own_bin():
    """Errors spaced more than a bin apart: one voxel per bin, so value and gradient are the exact ones."""
    N = 64
    e = ((torch.randperm(N, generator=torch.Generator().manual_seed(0)) + 0.5) / N).double().repeat(3, 1)
    fg = torch.rand(3, N, generator=torch.Generator().manual_seed(1)) < 0.4
    grads = []
    for tolerance in (None, 1 / N):
        ee = e.clone().requires_grad_()
        loss, _ = _LovaszExtension.apply(ee, fg, None, tolerance)
        loss.sum().backward()
        grads.append((loss.detach(), ee.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0, atol=1e-12)


def test_binned_falls_back_to_exact():
    from segloss.losses.lovasz_binned import binned_increments as _binned_increments

    e = torch.rand(2, 10, dtype=torch.float64)
    assert _binned_increments(e, torch.rand(2, 10, dtype=torch.float64), None, 0.1) is None  # soft target
    assert _binned_increments(e, torch.rand(2, 10) < 0.5, None, 1e-3) is None  # 1000 bins > 10 voxels
    assert _binned_increments(e, (torch.rand(2, 10) < 0.5).double(), None, 0.1) is not None  # binary float target
    x, lab = softmax_case(spatial=SHAPES["2d"])
    soft = F.softmax(torch.randn(3, 4, 6, 7, generator=torch.Generator().manual_seed(0)), 1)
    exact = lovasz_softmax(x.float(), soft)
    assert torch.equal(lovasz_softmax(x.float(), soft, tolerance=0.5), exact)


def test_binned_perfect_fully_ignored_and_bad_tolerance():
    x, lab = softmax_case(spatial=SHAPES["2d"])
    logits = 50.0 * (2 * (lab == 1).float() - 1)
    assert float(lovasz_hinge(logits.unsqueeze(1), (lab == 1).float(), tolerance=1e-3)) == 0.0
    xs = x.float().requires_grad_()
    out = lovasz_softmax(xs, torch.full_like(lab, 255), ignore_index=255, per_image=True, tolerance=1e-2)
    out.backward()
    assert float(out.detach()) == 0.0 and torch.isfinite(xs.grad).all()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tolerance"):
            LovaszSoftmaxLoss(tolerance=bad)
        with pytest.raises(ValueError, match="tolerance"):
            lovasz_hinge(x[:, :1].float(), (lab == 1).float(), tolerance=bad)
    assert LovaszHingeLoss(tolerance=1e-3).tolerance == 1e-3
