"""Dice family: parity with MONAI 1.6.1, float64 reference formulas for the extensions, bad input, memory."""

import warnings

import monai.losses as ml
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import segloss
from segloss.losses.dice import dice_loss

SPATIAL = {"2d": (6, 7), "3d": (4, 5, 3)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: OpenMP hand-offs between ops cost more than the maths on this shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TOL = dict(atol=1e-5, rtol=1e-5)


def make_data(kind, spatial, B=2, C=3, seed=0):
    """(logits, segloss target, MONAI target, extra MONAI kwargs) for a target kind.

    ``binary``: one channel, sigmoid, (B,1,*) float mask. ``labels``: softmax, (B,1,*) integer map (MONAI with
    to_onehot_y). ``onehot``: softmax, dense float one-hot. Class C-1 is absent from item 0 (an empty class).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":
        x = torch.randn(B, 1, *spatial, generator=g) * 2
        y = (torch.rand(B, 1, *spatial, generator=g) > 0.6).float()
        return x, y, y, dict(sigmoid=True)
    x = torch.randn(B, C, *spatial, generator=g) * 2
    lab = torch.randint(0, C, (B, 1, *spatial), generator=g)
    lab[0][lab[0] == C - 1] = 0
    if kind == "labels":
        return x, lab, lab, dict(softmax=True, to_onehot_y=True)
    onehot = F.one_hot(lab[:, 0], C).movedim(-1, 1).float()
    return x, onehot, onehot, dict(softmax=True)


def assert_same(ours, theirs, x, y_ours, y_theirs):
    """Value and input gradient of two loss callables agree to 1e-5."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-channel warnings of both libraries
        a = ours(x1, y_ours)
        b = theirs(x2, y_theirs)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, **TOL)
    (g1,) = torch.autograd.grad(a.sum(), x1)
    (g2,) = torch.autograd.grad(b.sum(), x2)
    torch.testing.assert_close(g1, g2, **TOL)
    return a


def _weight(extra, kind, include_background, C=3, full=False):
    if extra != "weight":
        return None
    n = 1 if kind == "binary" else (C if include_background or full else C - 1)
    return [0.5, 2.0, 1.5][:n] if n > 1 else 2.0


EXTRAS = ["plain", "squared_pred", "jaccard", "weight"]


def options(act, include_background, reductions):
    """Constructor kwargs for every (batch, reduction) pair (looped inside a test: cheaper than parametrize)."""
    for batch in (False, True):
        for reduction in reductions:
            yield dict(act, include_background=include_background, batch=batch, reduction=reduction)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["binary", "labels", "onehot"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("extra", EXTRAS)
def test_dice_matches_monai(dim, kind, include_background, extra):
    x, y, ym, act = make_data(kind, SPATIAL[dim])
    for kw in options(act, include_background, ["mean", "sum", "none"]):
        if extra in ("squared_pred", "jaccard"):
            kw[extra] = True
        w = _weight(extra, kind, include_background)
        assert_same(segloss.DiceLoss(**kw, weight=w), ml.DiceLoss(**kw, weight=w), x, y, ym)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["binary", "labels", "onehot"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
def test_generalized_dice_matches_monai(dim, kind, include_background, w_type):
    x, y, ym, act = make_data(kind, SPATIAL[dim])
    for kw in options(act, include_background, ["mean", "sum", "none"]):
        kw["w_type"] = w_type
        assert_same(segloss.GeneralizedDiceLoss(**kw), ml.GeneralizedDiceLoss(**kw), x, y, ym)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["binary", "labels", "onehot"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("extra", EXTRAS + ["label_smoothing"])
def test_dice_ce_matches_monai(dim, kind, include_background, extra):
    x, y, ym, act = make_data(kind, SPATIAL[dim])
    for kw in options(act, include_background, ["mean", "sum"]):
        if extra in ("squared_pred", "jaccard"):
            kw[extra] = True
        if extra == "label_smoothing":
            kw.update(label_smoothing=0.1, lambda_dice=0.7, lambda_ce=1.3)
        w = _weight(extra, kind, include_background, full=True)  # MONAI: CE weight has C entries
        mon = ml.DiceCELoss(**kw, weight=None if w is None else torch.tensor(w).reshape(-1))
        assert_same(segloss.DiceCELoss(**kw, weight=w), mon, x, y, ym)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("kind", ["binary", "labels", "onehot"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("extra", EXTRAS + ["alpha"])
def test_dice_focal_matches_monai(dim, kind, include_background, extra):
    x, y, ym, act = make_data(kind, SPATIAL[dim])
    for kw in options(act, include_background, ["mean", "sum", "none"]):
        if extra in ("squared_pred", "jaccard"):
            kw[extra] = True
        if extra == "alpha":
            kw.update(alpha=0.25, gamma=1.5, lambda_focal=0.5)
        w = _weight(extra, kind, include_background)
        assert_same(segloss.DiceFocalLoss(**kw, weight=w), ml.DiceFocalLoss(**kw, weight=w), x, y, ym)


@pytest.mark.parametrize("ignore_index", [255, 1, -1])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_ignore_index_matches_monai(ignore_index, include_background):
    x, lab, _, _ = make_data("labels", (6, 7), C=4)
    lab[:, :, :2] = ignore_index
    kw = dict(softmax=True, to_onehot_y=True, ignore_index=ignore_index, include_background=include_background)
    assert_same(segloss.DiceLoss(**kw), ml.DiceLoss(**kw), x, lab, lab)


def test_dice_other_act_soft_label_and_batch_of_one():
    x, y, _, _ = make_data("onehot", (5, 6), B=1)
    soft = y * 0.8 + 0.05
    for kw in (dict(other_act=torch.tanh), dict(sigmoid=True, soft_label=True), dict(softmax=True, soft_label=True)):
        assert_same(segloss.DiceLoss(**kw), ml.DiceLoss(**kw), x, soft, soft)
        assert_same(segloss.JaccardLoss(**kw), ml.DiceLoss(jaccard=True, **kw), x, soft, soft)
    kw = dict(softmax=True, soft_label=True)
    assert_same(segloss.GeneralizedDiceLoss(**kw), ml.GeneralizedDiceLoss(**kw), x, soft, soft)


def test_dice_ce_options_beyond_monai():
    x, lab, _, _ = make_data("labels", (6, 7))
    onehot = F.one_hot(lab[:, 0], 3).movedim(-1, 1).float()
    w = [0.2, 1.0, 3.0]
    # ce_weighted_mean: a one-hot target gives the label map's value (torch's weighted mean)
    a = segloss.DiceCELoss(softmax=True, weight=w, ce_weighted_mean=True)(x, onehot)
    b = segloss.DiceCELoss(softmax=True, weight=w)(x, lab)
    torch.testing.assert_close(a, b)
    # sigmoid_ce: multi-label BCE with pos_weight instead of MONAI's softmax CE
    ce = F.binary_cross_entropy_with_logits(x, onehot, pos_weight=torch.tensor(w).view(3, 1, 1))
    dice = segloss.DiceLoss(sigmoid=True, weight=w)(x, onehot)
    torch.testing.assert_close(segloss.DiceCELoss(sigmoid=True, weight=w, sigmoid_ce=True)(x, onehot), dice + ce)


def test_dice_focal_use_softmax_is_softmax_focal():
    x, lab, _, _ = make_data("labels", (6, 7))
    got = segloss.DiceFocalLoss(softmax=True, use_softmax=True, gamma=2.0)(x, lab)
    logp = x.double().log_softmax(1)
    focal = -((1 - logp.exp()) ** 2 * logp).gather(1, lab).mean()
    dice = segloss.DiceLoss(softmax=True)(x, lab)
    torch.testing.assert_close(got.double(), dice.double() + focal, **TOL)


# ---------------------------------------------------------------- float64 references for the extensions


def naive_dice(x, lab, C, *, wm=None, ignore_index=None, batch=False, jaccard=False, empty="smooth", bg=True):
    """float64 Dice from the one-hot of ``lab`` (B,1,*), per-voxel weights ``wm`` (B,1,*)."""
    x = x.double()
    p = x.softmax(1) if C > 1 else x.sigmoid()
    valid = torch.ones_like(lab, dtype=torch.float64) if ignore_index is None else (lab != ignore_index).double()
    v = valid * (1.0 if wm is None else wm.double())
    g = F.one_hot(torch.where(lab == ignore_index, 0, lab)[:, 0], C).movedim(-1, 1).double() if C > 1 else lab.double()
    dims = tuple(range(2, x.ndim)) if not batch else (0, *range(2, x.ndim))
    tp, P, G = (v * p * g).sum(dims), (v * p).sum(dims), (v * g).sum(dims)
    count = v.sum(dims)
    if not bg:
        tp, P, G = tp[..., 1:], P[..., 1:], G[..., 1:]
    den = 2 * (P + G - tp) if jaccard else P + G
    f = 1 - (2 * tp + 1e-5) / (den + 1e-5)
    if empty == "fp_rate":
        f = torch.where(G == 0, P / count.clamp_min(1e-300), f)
    return f.mean()


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("jaccard", [False, True])
@pytest.mark.parametrize("empty", ["smooth", "fp_rate"])
@pytest.mark.parametrize("bg", [True, False])
def test_dice_weight_map_ignore_index_fp_rate_match_float64_reference(batch, jaccard, empty, bg):
    x, lab, _, _ = make_data("labels", (5, 6, 4), C=4)
    lab[1, :, :1] = 255
    wm = torch.rand(2, 1, 5, 6, 4) * 2
    kw = dict(softmax=True, batch=batch, jaccard=jaccard, empty_target=empty, include_background=bg, ignore_index=255)
    x1 = x.clone().requires_grad_(True)
    x2 = x.double().requires_grad_(True)
    got = segloss.DiceLoss(**kw)(x1, lab, wm)
    ref = naive_dice(x2, lab, 4, wm=wm, ignore_index=255, batch=batch, jaccard=jaccard, empty=empty, bg=bg)
    torch.testing.assert_close(got.double(), ref, **TOL)
    (g1,) = torch.autograd.grad(got, x1)
    (g2,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(g1.double(), g2, **TOL)


def test_fp_rate_empty_class_values():
    # class 1 absent; confident correct prediction (3e-7 per voxel) vs predicting it everywhere
    N = 10_000
    lab = torch.zeros(1, 1, N, dtype=torch.long)
    good = torch.stack([torch.zeros(N), torch.full((N,), 3e-7)])[None]
    bad = torch.stack([torch.zeros(N), torch.ones(N)])[None]
    for loss_cls in (segloss.DiceLoss, segloss.JaccardLoss, segloss.TverskyLoss, segloss.FocalTverskyLoss):
        smooth = loss_cls(include_background=False, reduction="none")(good, lab).flatten()
        fp = loss_cls(include_background=False, reduction="none", empty_target="fp_rate")
        assert smooth.item() > 0.95  # MONAI: a near-perfect empty prediction still costs ~1
        torch.testing.assert_close(fp(good, lab).flatten(), torch.tensor([3e-7]))
        torch.testing.assert_close(fp(bad, lab).flatten(), torch.tensor([1.0]))
    gdl = segloss.GeneralizedDiceLoss(include_background=False, reduction="none", empty_target="fp_rate")
    torch.testing.assert_close(gdl(good, lab).flatten(), torch.tensor([3e-7]))
    assert segloss.GeneralizedDiceLoss(include_background=False)(bad, lab).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(gdl(bad, lab).flatten(), torch.tensor([1.0]))


def test_generalized_dice_weight_map_matches_float64_reference():
    x, lab, _, _ = make_data("labels", (6, 5), C=3)
    wm = torch.rand(2, 1, 6, 5) + 0.5
    x1, x2 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    got = segloss.GeneralizedDiceLoss(softmax=True, w_type="simple")(x1, lab, wm)
    p, g = x2.softmax(1), F.one_hot(lab[:, 0], 3).movedim(-1, 1).double()
    v = wm.double()
    tp, P, G = (v * p * g).sum((2, 3)), (v * p).sum((2, 3)), (v * g).sum((2, 3))
    r = torch.where(G > 0, 1 / G, 0.0)
    r = r + (G == 0) * r.amax(1, keepdim=True)
    ref = (1 - (2 * (r * tp).sum(1) + 1e-5) / ((r * (P + G)).sum(1) + 1e-5)).mean()
    torch.testing.assert_close(got.double(), ref, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, x1)[0].double(), torch.autograd.grad(ref, x2)[0], **TOL)


def test_dense_target_non_binary_weight_map_matches_label_map():
    x, lab, _, _ = make_data("labels", (6, 5))
    onehot = F.one_hot(lab[:, 0], 3).movedim(-1, 1).float()
    wm = torch.rand(2, 1, 6, 5) + 0.5
    a = segloss.DiceLoss(softmax=True)(x, lab, wm)
    b = segloss.DiceLoss(softmax=True)(x, onehot, wm)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- ignore_index == cropping

ALL_LOSSES = {
    "dice": lambda **k: segloss.DiceLoss(softmax=True, **k),
    "jaccard": lambda **k: segloss.JaccardLoss(softmax=True, **k),
    "gdl": lambda **k: segloss.GeneralizedDiceLoss(softmax=True, **k),
    "tversky": lambda **k: segloss.TverskyLoss(softmax=True, alpha=0.3, beta=0.7, **k),
    "focal_tversky": lambda **k: segloss.FocalTverskyLoss(softmax=True, **k),
    "dice_ce": lambda **k: segloss.DiceCELoss(softmax=True, weight=[0.5, 1.0, 2.0], **k),
    "dice_focal": lambda **k: segloss.DiceFocalLoss(softmax=True, **k),
    "dice_focal_softmax": lambda **k: segloss.DiceFocalLoss(softmax=True, use_softmax=True, **k),
}


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("empty", ["smooth", "fp_rate"])
def test_ignored_voxels_equal_cropping(name, batch, empty):
    x, lab, _, _ = make_data("labels", (6, 8), C=3)
    lab_ign = lab.clone()
    lab_ign[..., 6:] = 255
    make = ALL_LOSSES[name]
    x1 = x.clone().requires_grad_(True)
    x2 = x[..., :6].clone().requires_grad_(True)
    a = make(ignore_index=255, batch=batch, empty_target=empty)(x1, lab_ign)
    b = make(batch=batch, empty_target=empty)(x2, lab[..., :6])
    torch.testing.assert_close(a, b, **TOL)
    (g1,) = torch.autograd.grad(a, x1)
    (g2,) = torch.autograd.grad(b, x2)
    torch.testing.assert_close(g1[..., :6], g2, **TOL)
    assert not g1[..., 6:].any()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_bad_input_raises_value_error_naming_the_argument(name):
    loss = ALL_LOSSES[name]()
    x, lab, _, _ = make_data("labels", (4, 5))
    onehot = F.one_hot(lab[:, 0], 3).movedim(-1, 1).float()
    cases = [
        (x, lab[..., :4], "target"),  # mismatched shape
        (x, onehot[:, :2], "target"),
        (x, torch.full_like(lab, 3), "target"),  # label >= C
        (x, torch.full_like(lab, -1), "target"),  # negative label
        (x, lab.float() + 0.5, "target"),  # non-integer float labels
        (x.masked_fill(torch.rand_like(x) > 0.9, float("nan")), lab, "input"),
        (x.masked_fill(torch.rand_like(x) > 0.9, float("inf")), lab, "input"),
    ]
    for inp, tgt, arg in cases:
        with pytest.raises(ValueError, match=arg):
            loss(inp, tgt)
    with pytest.raises(ValueError, match="weight_map"):
        loss(x, lab, -torch.ones_like(lab, dtype=torch.float))


@pytest.mark.parametrize("name", ["dice", "gdl", "tversky", "dice_ce"])
def test_fused_softmax_path_checks_its_sums_not_the_input(name):
    """The softmax + label-map path checks its per-class sums instead of making one more pass over the input:
    NaN/+Inf still raise (above), a -Inf logit is a probability of 0 (the loss of a very negative logit), and a
    voxel without a finite logit, or (with CE) an -Inf logit at the label, raises."""
    loss = ALL_LOSSES[name]()
    x, lab, _, _ = make_data("labels", (4, 5))
    lab = lab.clamp_max(1)  # class 2 is never the label: its logits may be -Inf even with CE
    masked = x.clone()
    masked[:, 2, :2] = float("-inf")
    very_negative = x.clone()
    very_negative[:, 2, :2] = -1e4  # exp underflows to exactly 0 in float32
    xi = masked.requires_grad_()
    value = loss(xi, lab)
    value.backward()
    torch.testing.assert_close(value, loss(very_negative, lab), rtol=0, atol=0)
    assert torch.isfinite(xi.grad).all()
    no_finite_logit = x.clone()
    no_finite_logit[0, :, 1, 1] = float("-inf")
    with pytest.raises(ValueError, match="input"):
        loss(no_finite_logit, lab)
    if name == "dice_ce":
        at_label = x.clone()
        at_label[0, lab[0, 0, 0, 0], 0, 0] = float("-inf")
        with pytest.raises(ValueError, match="input"):
            loss(at_label, lab)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="empty_target"):
        segloss.DiceLoss(empty_target="zero")
    with pytest.raises(ValueError, match="sync_batch"):
        segloss.DiceLoss(sync_batch=True)
    with pytest.raises(ValueError, match="weight"):
        segloss.DiceLoss(weight=[1.0, -1.0])
    with pytest.raises(ValueError, match="weight"):
        segloss.DiceLoss(softmax=True, weight=[1.0, 2.0])(*make_data("labels", (4, 4))[:2])
    with pytest.raises(ValueError, match="w_type"):
        segloss.GeneralizedDiceLoss(w_type="cubic")
    with pytest.raises(ValueError, match="reduction"):
        segloss.DiceCELoss(reduction="none")
    with pytest.raises(ValueError, match="lambda_dice"):
        segloss.DiceFocalLoss(lambda_dice=-1)
    with pytest.raises(ValueError, match="Incompatible"):
        segloss.DiceLoss(sigmoid=True, softmax=True)


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("empty", ["smooth", "fp_rate"])
def test_empty_foreground_and_all_ignored_are_finite(name, empty):
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    make = ALL_LOSSES[name]
    background_only = torch.zeros(1, 1, 5, 5, dtype=torch.long)
    loss = make(include_background=False, empty_target=empty)(x, background_only)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    all_ignored = torch.full((1, 1, 5, 5), 255)
    loss = make(ignore_index=255, empty_target=empty)(x, all_ignored)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and not g.any()
    if name in ("dice", "jaccard", "gdl", "tversky", "focal_tversky"):
        assert loss.item() == 0.0  # documented: 1 - smooth_nr/smooth_dr = 0, and fp_rate 0 with no valid voxel


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_bf16_autocast_gives_float32_close_to_float32(name):
    x, lab, _, _ = make_data("labels", (8, 8))
    loss = ALL_LOSSES[name]()
    ref = loss(x, lab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(x.bfloat16(), lab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.0, 1e4),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(ALL_LOSSES)),
    batch=st.booleans(),
    empty=st.sampled_from(["smooth", "fp_rate"]),
)
def test_gradients_are_finite(scale, seed, name, batch, empty):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 3, 4, 4, generator=g) * scale).requires_grad_(True)
    lab = torch.randint(0, 3, (2, 1, 4, 4), generator=g)
    lab[0] = 0
    loss = ALL_LOSSES[name](batch=batch, empty_target=empty)(x, lab)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ---------------------------------------------------------------- memory: a label map is never one-hot expanded


class _BigFloatAllocations(TorchDispatchMode):
    """Records the distinct storages of float op outputs holding at least ``numel`` elements that are new: outputs
    sharing storage with an input (views, detach, in-place ops) allocate nothing and are skipped."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.numel:
                if t.untyped_storage().data_ptr() not in inputs:
                    self.storages.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: segloss.DiceLoss(softmax=True, to_onehot_y=True),
        lambda: segloss.GeneralizedDiceLoss(softmax=True, to_onehot_y=True),
        lambda: segloss.TverskyLoss(softmax=True, to_onehot_y=True, ignore_index=255),
        lambda: segloss.FocalTverskyLoss(softmax=True, batch=True),
        lambda: segloss.DiceCELoss(softmax=True, to_onehot_y=True, weight=[1.0, 2.0, 1.0, 1.0, 3.0]),
        lambda: segloss.JaccardLoss(softmax=True, include_background=False),
    ],
)
def test_label_map_allocates_only_probabilities_and_gradient(make):
    """Forward: one (B, C, N) float tensor (the softmax; DiceCE's log-softmax shares it). Backward: one more, the
    input gradient. A one-hot target, or autograd through gather/scatter, would add more."""
    B, C, spatial = 2, 5, (8, 9, 10)
    x = torch.randn(B, C, *spatial, requires_grad=True)
    lab = torch.randint(0, C, (B, 1, *spatial))
    lab[0, 0, 0] = 255
    loss = make()
    with _BigFloatAllocations(B * C * 720) as mode:
        value = loss(x, lab.clamp(max=C - 1) if loss.ignore_index is None else lab)
    assert len(mode.storages - {x.untyped_storage().data_ptr()}) == 1
    with _BigFloatAllocations(B * C * 720) as mode:
        value.backward()
    assert len(mode.storages - {x.untyped_storage().data_ptr()}) == 1


def test_memory_check_catches_a_one_hot():
    # the check above can fail: the dense path (what MONAI does) allocates the one-hot and p * g
    B, C, spatial = 2, 5, (8, 9, 10)
    x = torch.randn(B, C, *spatial, requires_grad=True)
    onehot = F.one_hot(torch.randint(0, C, (B, *spatial)), C).movedim(-1, 1)
    with _BigFloatAllocations(B * C * 720) as mode:
        dice_loss(x, onehot, softmax=True)
    assert len(mode.storages - {x.untyped_storage().data_ptr()}) > 1


@pytest.mark.parametrize("squared_pred", [False, True])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("loss_cls", [segloss.DiceLoss, segloss.DiceCELoss])
def test_fused_softmax_label_path_matches_autograd_path(squared_pred, batch, loss_cls):
    """softmax=True with a label map takes the fused backward (the table form for Dice alone, the closed form
    with squared_pred or the CE term); other_act=softmax the autograd one."""
    x, lab, _, _ = make_data("labels", (5, 6, 3), C=4)
    lab[0, :, 0] = 255
    wm = torch.rand(2, 1, 5, 6, 3) + 0.5
    kw = dict(squared_pred=squared_pred, batch=batch, weight=[0.5, 1.0, 2.0, 3.0], ignore_index=255)
    fused = loss_cls(softmax=True, **kw)
    plain = loss_cls(other_act=lambda t: t.softmax(1), **kw)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = fused(x1, lab, wm), plain(x2, lab, wm)
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(torch.autograd.grad(a, x1)[0], torch.autograd.grad(b, x2)[0], **TOL)


@pytest.mark.parametrize(
    "loss",
    [
        segloss.DiceCELoss(softmax=True, squared_pred=True, weight=[1.0, 2.0, 0.5], lambda_ce=0.7),  # closed form
        segloss.GeneralizedDiceLoss(softmax=True),  # table form
    ],
    ids=["closed_form", "table_form"],
)
def test_fused_backward_gradcheck(loss):
    # the sums are float32 by design (class_sums), so gradcheck runs with float32-sized tolerances
    lab = torch.randint(0, 3, (2, 1, 4, 3))
    wm = torch.rand(2, 1, 4, 3) + 0.5
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: loss(t, lab, wm).double(), (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


# ---------------------------------------------------------------- issue 14 defects


@pytest.mark.parametrize("kwargs", [dict(label_smoothing=0.1), dict(sigmoid=True, sigmoid_ce=True)])
def test_dice_ce_rejects_an_inf_logit_its_ce_term_diverges_at(kwargs):
    # the Dice sums accept a -Inf logit (a probability 0); the smoothed CE (or BCE) term would return inf
    x, lab, _, _ = make_data("labels", (6, 7))
    x[0, 1, 0, 0] = float("-inf")
    if kwargs.get("sigmoid"):
        lab = F.one_hot(lab[:, 0], 3).movedim(-1, 1).float()
        x[0, 1, 0, 0] = float("inf") if lab[0, 1, 0, 0] == 0 else float("-inf")
    with pytest.raises(ValueError, match="`input` contains NaN or Inf"):
        segloss.DiceCELoss(softmax=not kwargs.get("sigmoid"), **kwargs)(x, lab)


def test_dice_focal_use_softmax_mean_is_cross_entropy_at_gamma_0_with_ignore_and_weights():
    # the documented "mean" of the softmax focal term: the valid (weighted) voxels, no channel factor
    x, lab, _, _ = make_data("labels", (6, 7))
    lab[0, 0, :2] = 255
    wm = torch.rand(lab.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    loss = segloss.DiceFocalLoss(softmax=True, use_softmax=True, gamma=0.0, lambda_dice=0.0, ignore_index=255)
    got = loss(x, lab, weight_map=wm)
    valid = (lab != 255).double() * wm.double()
    ce = F.cross_entropy(x.double(), lab[:, 0].clamp_max(2), reduction="none").unsqueeze(1)
    torch.testing.assert_close(got.double(), (ce * valid).sum() / valid.sum(), **TOL)


def test_dice_focal_takes_a_per_class_alpha_as_focal_loss():
    x, lab, _, _ = make_data("labels", (6, 7))
    alpha = [0.2, 0.3, 0.5]
    got = segloss.DiceFocalLoss(softmax=True, alpha=alpha, lambda_dice=0.0)(x, lab)
    want = segloss.FocalLoss(alpha=alpha, ce_mean=True)(x, lab)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="alpha"):
        segloss.DiceFocalLoss(alpha=[0.2, -1.0, 0.5])


CLASSIFICATION = {
    "dice": (dict(to_onehot_y=True, softmax=True), segloss.DiceLoss),
    "gdl": (dict(to_onehot_y=True, softmax=True), segloss.GeneralizedDiceLoss),
    "tversky": (dict(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7), segloss.TverskyLoss),
    "dice_ce": (dict(to_onehot_y=True, softmax=True), segloss.DiceCELoss),
    "dice_focal": (dict(to_onehot_y=True, softmax=True, batch=True), segloss.DiceFocalLoss),
    "focal": (dict(to_onehot_y=True, gamma=0.0), segloss.FocalLoss),
    "focal_softmax": (dict(to_onehot_y=True, use_softmax=True), segloss.FocalLoss),
}


@pytest.mark.parametrize("name", list(CLASSIFICATION))
def test_classification_shaped_input_is_a_one_voxel_image(name):
    # MONAI's losses take (B, C) logits with a (B, 1) label; here that is one voxel per item
    kwargs, cls = CLASSIFICATION[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=g)
    y = torch.randint(0, 3, (5, 1), generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = cls(**kwargs)(x1, y)
    want = cls(**kwargs)(x2.unsqueeze(-1), y.unsqueeze(-1))
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, x1)[0], torch.autograd.grad(want, x2)[0], **TOL)


@pytest.mark.parametrize("use_softmax", [False, True])
def test_classification_shaped_focal_matches_monai(use_softmax):
    # (MONAI's Dice family sums (B, C) over an empty list of dims, which torch reads as every dim: one Dice over
    # items and classes; segloss keeps one Dice per (item, class), see docs/losses.md)
    x = torch.randn(5, 3)
    y = torch.randint(0, 3, (5, 1))
    kwargs = dict(to_onehot_y=True, use_softmax=use_softmax, alpha=0.25)
    torch.testing.assert_close(segloss.FocalLoss(**kwargs)(x, y), ml.FocalLoss(**kwargs)(x, y), **TOL)


def test_classification_focal_at_gamma_0_is_bce_on_the_one_hot_label():
    x = torch.randn(5, 3)
    y = torch.randint(0, 3, (5, 1))
    got = segloss.FocalLoss(to_onehot_y=True, gamma=0.0)(x, y)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(x, F.one_hot(y[:, 0], 3).float()))
