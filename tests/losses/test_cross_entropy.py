"""WeightedCrossEntropyLoss against torch (F.cross_entropy, BCEWithLogitsLoss) and float64 formulas."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from segloss.losses import WeightedCrossEntropyLoss
from segloss.losses.cross_entropy import weighted_cross_entropy

SPATIAL = [(5, 6), (3, 4, 5)]
CW = [0.5, 2.0, 1.0, 3.0]


def close64(out, ref):
    """float32 result against a float64 reference."""
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def one_hot(lab, C):
    """(B,*) integer labels -> (B,C,*) float one-hot (test reference only)."""
    return F.one_hot(lab, C).movedim(-1, 1).float()


def ce_reference(x, lab, cw, eps, v, mean=True):
    """float64 softmax CE with torch's class-weight/label-smoothing formula and voxel weights v:
    l_i = (1-eps) cw_y (-log p_y) + eps/C sum_c cw_c (-log p_c);  mean = sum v l / sum v cw_y."""
    x, v = x.double(), v.double()
    C = x.shape[1]
    cw = torch.ones(C, dtype=torch.float64) if cw is None else torch.tensor(cw, dtype=torch.float64)
    nlogp = -x.log_softmax(1)
    cwv = cw.view(1, C, *([1] * (x.ndim - 2)))
    at_label = (nlogp * one_hot(lab, C).double()).sum(1)
    loss = (1 - eps) * cw[lab] * at_label + eps / C * (cwv * nlogp).sum(1)
    return (v * loss).sum() / (v * cw[lab]).sum() if mean else v * loss


def bce_reference(x, g, cw, pw, eps, v):
    """float64 per-element BCE: q y' softplus(-x) + (1-y') softplus(x), times cw_c * v; returns (loss, weights)."""
    x, g = x.double(), g.double()
    C = x.shape[1]
    shape = (1, C, *([1] * (x.ndim - 2)))
    q = 1.0 if pw is None else torch.tensor(pw, dtype=torch.float64).expand(C).reshape(shape)
    c = torch.ones(shape, dtype=torch.float64) if cw is None else torch.tensor(cw, dtype=torch.float64).view(shape)
    y = g * (1 - eps) + eps / 2
    loss = q * y * F.softplus(-x) + (1 - y) * F.softplus(x)
    e = c * v.double()
    return e * loss, e.expand_as(loss)


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("cw", [None, CW])
@pytest.mark.parametrize("ignore_index", [None, 255, 1])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_labels_equal_torch(spatial, cw, ignore_index, eps, reduction):
    B, C = 2, 4
    x = torch.randn(B, C, *spatial, requires_grad=True)
    lab = torch.randint(0, C, (B, *spatial))
    if ignore_index == 255:
        lab[0, :2] = 255
    w = None if cw is None else torch.tensor(CW)
    ref = F.cross_entropy(
        x,
        lab,
        weight=w,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=eps,
        reduction=reduction,
    )
    loss = WeightedCrossEntropyLoss(
        class_weight=cw, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction
    )
    for target in (lab, lab[:, None], lab[:, None].float()):  # (B,*), (B,1,*), float labels
        x2 = x.detach().clone().requires_grad_()
        out = loss(x2, target)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref)
        g_ref = torch.autograd.grad(ref.sum(), x, retain_graph=True)[0]
        torch.testing.assert_close(torch.autograd.grad(out.sum(), x2)[0], g_ref)


def test_no_weights_is_torch():
    x = torch.randn(2, 5, 8, 9, requires_grad=True)
    lab = torch.randint(0, 5, (2, 1, 8, 9))
    for reduction in ("mean", "sum"):
        ours = WeightedCrossEntropyLoss(reduction=reduction)(x, lab)  # label map: segloss's fused sum
        (g_ours,) = torch.autograd.grad(ours, x)
        ref = F.cross_entropy(x, lab[:, 0], reduction=reduction)
        (g_ref,) = torch.autograd.grad(ref, x)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-7)
    x = x.detach()
    probs = torch.rand(2, 5, 8, 9).softmax(1)
    assert torch.equal(
        WeightedCrossEntropyLoss(label_smoothing=0.2)(x, probs), F.cross_entropy(x, probs, label_smoothing=0.2)
    )


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_softmax_dense_targets(spatial, eps):
    B, C = 2, 4
    x = torch.randn(B, C, *spatial)
    lab = torch.randint(0, C, (B, *spatial))
    probs = torch.rand(B, C, *spatial).softmax(1)
    cw = torch.tensor(CW)
    # one-hot target == the label map, also with class weights (unlike torch's prob-target mean)
    loss = WeightedCrossEntropyLoss(class_weight=CW, label_smoothing=eps)
    torch.testing.assert_close(loss(x, one_hot(lab, C)), loss(x, lab))
    # conventions shared with torch: no class weight, or "sum"/"none"
    torch.testing.assert_close(
        WeightedCrossEntropyLoss(label_smoothing=eps)(x, probs), F.cross_entropy(x, probs, label_smoothing=eps)
    )
    for red in ("sum", "none"):
        out = WeightedCrossEntropyLoss(class_weight=CW, label_smoothing=eps, reduction=red)(x, probs)
        torch.testing.assert_close(out, F.cross_entropy(x, probs, weight=cw, label_smoothing=eps, reduction=red))
    # mean with class weights: sum l / sum_i sum_c cw_c g_ic (torch divides by the voxel count)
    l_none = F.cross_entropy(x.double(), probs.double(), weight=cw.double(), label_smoothing=eps, reduction="none")
    ref = l_none.sum() / (cw.double().view(1, C, *([1] * len(spatial))) * probs.double()).sum()
    close64(loss(x, probs), ref)


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("dense", [False, True])
def test_weight_map_against_float64_formula(spatial, dense):
    B, C, eps = 2, 4, 0.1
    x = torch.randn(B, C, *spatial)
    lab = torch.randint(0, C, (B, *spatial))
    wm = torch.rand(B, 1, *spatial) * 3
    target = lab.clone()
    target[1, 0] = 255
    valid = (target != 255).double()
    ref = ce_reference(x, lab, CW, eps, wm[:, 0].double() * valid)
    if dense:  # one-hot target; the ignored voxels enter through the weight map
        target, wm = one_hot(lab, C), wm * valid[:, None].float()
        loss = WeightedCrossEntropyLoss(class_weight=CW, label_smoothing=eps)
    else:
        loss = WeightedCrossEntropyLoss(class_weight=CW, label_smoothing=eps, ignore_index=255)
    close64(loss(x, target, weight_map=wm), ref)
    none = WeightedCrossEntropyLoss(class_weight=CW, label_smoothing=eps, ignore_index=255, reduction="none")
    ref_none = ce_reference(x, lab, CW, eps, wm[:, 0].double() * valid, mean=False)
    close64(none(x, target, weight_map=wm[:, 0]), ref_none)


def test_dense_class_index_ignore_matches_label_ignore():
    x = torch.randn(2, 3, 6, 6)
    lab = torch.randint(0, 3, (2, 1, 6, 6))
    a = WeightedCrossEntropyLoss(ignore_index=2, class_weight=[1.0, 2.0, 0.5])
    torch.testing.assert_close(a(x, one_hot(lab[:, 0], 3)), a(x, lab))
    torch.testing.assert_close(
        a(x, lab), F.cross_entropy(x, lab[:, 0], ignore_index=2, weight=torch.tensor([1.0, 2.0, 0.5]))
    )


def test_softmax_dense_sentinel_ignores_the_whole_voxel():
    """A sentinel in any channel of a dense target drops that voxel (softmax has one loss per voxel)."""
    x = torch.randn(2, 3, 5, 5)
    lab = torch.randint(0, 3, (2, 1, 5, 5))
    target = one_hot(lab[:, 0], 3)
    target[0, 1, 0, :3] = 255  # one channel of three voxels
    lab[0, 0, 0, :3] = 255
    loss = WeightedCrossEntropyLoss(ignore_index=255, class_weight=[1.0, 2.0, 0.5])
    torch.testing.assert_close(loss(x, target), loss(x, lab))


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("cw, pw", [(None, None), (CW, None), (None, [2.0, 0.5, 1.0, 3.0]), (CW, 2.0)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sigmoid_multilabel_against_float64(spatial, cw, pw, eps):
    B, C = 2, 4
    x = torch.randn(B, C, *spatial) * 3
    g = (torch.rand(B, C, *spatial) > 0.6).float()
    wm = torch.rand(B, 1, *spatial)
    loss = WeightedCrossEntropyLoss(sigmoid=True, class_weight=cw, pos_weight=pw, label_smoothing=eps)
    for v in (None, wm, torch.rand(B, C, *spatial)):
        num, e = bce_reference(x, g, cw, pw, eps, torch.ones(1) if v is None else v)
        close64(loss(x, g, weight_map=v), num.sum() / e.sum())
    none = WeightedCrossEntropyLoss(sigmoid=True, class_weight=cw, pos_weight=pw, label_smoothing=eps, reduction="none")
    close64(none(x, g, weight_map=wm), bce_reference(x, g, cw, pw, eps, wm)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sigmoid_equals_bce_with_logits_where_conventions_agree(reduction):
    B, C = 2, 3
    x = torch.randn(B, C, 5, 4, 3)
    g = torch.rand(B, C, 5, 4, 3)  # soft multi-label target
    pw = torch.tensor([0.5, 2.0, 1.5]).view(C, 1, 1, 1)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=pw, reduction=reduction)(x, g)
    out = WeightedCrossEntropyLoss(sigmoid=True, pos_weight=[0.5, 2.0, 1.5], reduction=reduction)(x, g)
    torch.testing.assert_close(out, ref)
    if reduction != "mean":  # BCEWithLogitsLoss(weight=) divides by the count for "mean"; segloss by the weights
        cw = torch.tensor([0.3, 1.0, 4.0]).view(C, 1, 1, 1)
        ref = torch.nn.BCEWithLogitsLoss(weight=cw, reduction=reduction)(x, g)
        torch.testing.assert_close(
            WeightedCrossEntropyLoss(sigmoid=True, class_weight=[0.3, 1.0, 4.0], reduction=reduction)(x, g), ref
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps, pw", [(0.0, None), (0.15, [2.0, 0.5, 1.0, 3.0])])
def test_sigmoid_label_map_equals_one_hot(reduction, eps, pw):
    B, C = 2, 4
    x = torch.randn(B, C, 4, 5, 3, requires_grad=True)
    lab = torch.randint(0, C, (B, 1, 4, 5, 3))
    lab[0, 0, 0] = 255
    wm = torch.rand(B, 1, 4, 5, 3)
    kw = dict(sigmoid=True, class_weight=CW, pos_weight=pw, label_smoothing=eps, reduction=reduction)
    out = WeightedCrossEntropyLoss(to_onehot_y=True, ignore_index=255, **kw)(x, lab, weight_map=wm)
    valid = (lab != 255).float()
    ref = WeightedCrossEntropyLoss(**kw)(x, one_hot(lab.clamp(max=C - 1)[:, 0], C), weight_map=wm * valid)
    torch.testing.assert_close(out, ref)
    ga, gb = (torch.autograd.grad(t.sum(), x, retain_graph=True)[0] for t in (out, ref))
    torch.testing.assert_close(ga, gb)


def test_sigmoid_binary_mask_forms():
    x = torch.randn(3, 1, 6, 7)
    m = (torch.rand(3, 6, 7) > 0.5).long()
    ref = F.binary_cross_entropy_with_logits(x, m[:, None].float())
    loss = WeightedCrossEntropyLoss(sigmoid=True)
    for target in (m, m[:, None], m[:, None].float(), m.bool()):
        torch.testing.assert_close(loss(x, target), ref)
    # a 255 sentinel in a binary mask is ignored element-wise
    m2 = m[:, None].clone()
    m2[0, 0, :3] = 255
    keep = m2 != 255
    ref = F.binary_cross_entropy_with_logits(x[keep], m2[keep].float())
    torch.testing.assert_close(WeightedCrossEntropyLoss(sigmoid=True, ignore_index=255)(x, m2), ref)


@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_fully_ignored_is_zero_with_zero_grad(sigmoid, dense):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    lab = torch.full((2, 1, 4, 4), 255)
    if dense:
        target, kw = one_hot(torch.zeros(2, 4, 4, dtype=torch.long), 3), {"weight_map": torch.zeros(2, 1, 4, 4)}
    else:
        target, kw = lab, {}
    out = WeightedCrossEntropyLoss(sigmoid=sigmoid, ignore_index=255, class_weight=[1.0, 2.0, 3.0])(x, target, **kw)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, x)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize(
    "kwargs, input, target, fwd, match",
    [
        ({}, torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 1, 4, 5)), {}, "target"),
        ({}, torch.randn(2, 3, 4, 4), torch.full((2, 1, 4, 4), 3), {}, "target"),
        ({}, torch.randn(2, 3, 4, 4), torch.full((2, 1, 4, 4), 1.5), {}, "non-integer"),
        ({}, torch.randn(2, 3, 4, 4), torch.rand(2, 2, 4, 4), {}, "target"),
        ({}, torch.full((2, 3, 4, 4), float("nan")), torch.zeros(2, 1, 4, 4), {}, "input"),
        ({"sigmoid": True}, torch.tensor([float("inf")]).expand(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), {}, "input"),
        ({}, torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), {"weight_map": -torch.ones(2, 1, 4, 4)}, "weight_map"),
        ({}, torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), {"weight_map": torch.ones(2, 3, 4, 4)}, "weight_map"),
        ({"class_weight": [1.0, 2.0]}, torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), {}, "class_weight"),
        (
            {"sigmoid": True, "pos_weight": [1.0, 2.0]},
            torch.randn(2, 3, 4, 4),
            torch.zeros(2, 3, 4, 4),
            {},
            "pos_weight",
        ),
        ({}, torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), {}, "sigmoid"),
        ({}, torch.randn(3), torch.zeros(3), {}, "input"),  # (B, C) is classification-shaped, accepted
    ],
)
def test_bad_input_names_the_argument(kwargs, input, target, fwd, match):
    with pytest.raises(ValueError, match=match):
        WeightedCrossEntropyLoss(**kwargs)(input, target, **fwd)


@pytest.mark.parametrize("kwargs", [{}, {"class_weight": [1.0, 2.0, 0.5], "ignore_index": 1}])
def test_label_path_checks_its_loss_not_the_input(kwargs):
    """On a label map NaN/Inf in the input are found in the loss: NaN and +Inf raise (also at an ignored voxel),
    -Inf off the label is a probability of 0, -Inf at the label raises."""
    loss = WeightedCrossEntropyLoss(**kwargs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    lab = torch.randint(0, 2, (2, 1, 4, 4), generator=g)  # class 2 is never the label
    lab[0, 0, 0, 0] = 0  # a voxel that is never ignored
    masked, very_negative = x.clone(), x.clone()
    masked[:, 2] = float("-inf")
    very_negative[:, 2] = -1e4
    value = loss(masked.requires_grad_(), lab)
    value.backward()
    torch.testing.assert_close(value, loss(very_negative, lab), rtol=0, atol=0)
    assert torch.isfinite(masked.grad).all()
    for bad in (float("nan"), float("inf")):
        for voxel in ((0, 0, 0, 0), tuple((lab == 1).nonzero()[0].tolist())):  # label 1 is ignored in one case
            with pytest.raises(ValueError, match="input"):
                loss(x.index_put(tuple(torch.tensor(i) for i in voxel), torch.tensor(bad)), lab)
    at_label = x.clone()
    at_label[0, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match="input"):
        loss(at_label, lab)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_weight": [1.0, -1.0]}, "class_weight"),
        ({"pos_weight": 2.0}, "pos_weight"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"reduction": "avg"}, "reduction"),
        ({"sigmoid": True, "pos_weight": [float("nan")]}, "pos_weight"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightedCrossEntropyLoss(**kwargs)


def test_functional_checks_python_weights():
    with pytest.raises(ValueError, match="class_weight"):
        weighted_cross_entropy(torch.randn(1, 2, 3), torch.zeros(1, 3), class_weight=[1.0, -2.0])


@pytest.mark.parametrize("sigmoid", [False, True])
def test_batch_of_one_and_bf16_autocast(sigmoid):
    x = torch.randn(1, 3, 16, 16)
    lab = torch.randint(0, 3, (1, 1, 16, 16))
    wm = torch.rand(1, 1, 16, 16)
    loss = WeightedCrossEntropyLoss(sigmoid=sigmoid, class_weight=[1.0, 2.0, 3.0])
    ref = loss(x, lab, weight_map=wm)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(xb, lab, weight_map=wm.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    out.backward()
    assert torch.isfinite(xb.grad.float()).all()


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.0, 80.0),
    sigmoid=st.booleans(),
    eps=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_gradients_are_finite(scale, sigmoid, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 3, 5, 5, generator=gen) * scale).requires_grad_()
    lab = torch.randint(0, 3, (2, 1, 5, 5), generator=gen)
    loss = WeightedCrossEntropyLoss(sigmoid=sigmoid, label_smoothing=eps, class_weight=[0.0, 1.0, 2.0])
    out = loss(x, lab, weight_map=torch.rand(2, 1, 5, 5, generator=gen))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs", [{}, {"class_weight": [1.0, 2.0, 0.5, 1.0, 3.0], "ignore_index": 255}])
def test_label_map_keeps_no_full_size_tensor_for_the_backward(kwargs):
    """The fused label-map path: the forward's log-softmax is freed, the backward allocates only the gradient.
    torch's cross-entropy allocates two in its backward, so the check can fail."""
    from test_dice import _BigFloatAllocations

    B, C, spatial = 2, 5, (8, 9, 10)
    x = torch.randn(B, C, *spatial, requires_grad=True)
    lab = torch.randint(0, C, (B, 1, *spatial))
    lab[0, 0, 0] = 255 if kwargs else 0
    numel = B * C * 720
    for fn, allowed in (
        (lambda: WeightedCrossEntropyLoss(**kwargs)(x, lab), 1),
        (lambda: F.cross_entropy(x, lab[:, 0].clamp(max=C - 1)), 2),
    ):
        value = fn()
        with _BigFloatAllocations(numel) as mode:
            value.backward()
        assert len(mode.storages - {x.untyped_storage().data_ptr()}) == allowed


def test_fused_label_cross_entropy_gradcheck():
    """The custom backward, with zero weights and negative or zero upstream gradients."""
    from segloss.losses._fused import LabelCrossEntropy as _LabelCrossEntropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 30, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 5, (2, 30), generator=g)
    v = torch.rand(2, 1, 30, generator=g, dtype=torch.float64)
    v[0, 0, :5] = 0
    assert torch.autograd.gradcheck(lambda x: _LabelCrossEntropy.apply(x, lab, v), (x,))
    assert torch.autograd.gradcheck(lambda x: -2 * _LabelCrossEntropy.apply(x, lab, None), (x,))
    assert torch.autograd.gradcheck(lambda x: 0 * _LabelCrossEntropy.apply(x, lab, v), (x,))
