"""FocalLoss against MONAI 1.6.1's FocalLoss (value and input gradient), float64 formulas and gradcheck."""

import itertools
import warnings

import monai
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from test_dice import _BigFloatAllocations

from segloss.losses import FocalLoss
from segloss.losses import _fused as fused_module
from segloss.losses._fused import SigmoidFocalAtLabel as _SigmoidFocalAtLabel
from segloss.losses._fused import SoftmaxFocalAtLabel as _SoftmaxFocalAtLabel
from segloss.losses.focal import focal_loss

B, C = 2, 4
ALPHAS = [None, 0.25, "per_class"]
WEIGHTS = [None, 2.0, "per_class"]


def one_hot(lab, C):
    """(B,*) integer labels -> (B,C,*) float one-hot (test reference only)."""
    return F.one_hot(lab, C).movedim(-1, 1).float()


def close64(out, ref):
    """float32 result against a float64 reference."""
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def per_class(value, n, base):
    return base[:n] if value == "per_class" else value


def value_and_grad(loss_fn, x, target, upstream=None):
    x = x.detach().clone().requires_grad_()
    out = loss_fn(x, target)
    (out if upstream is None else out * upstream).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
# (a sentinel ignore_index on a dense target differs by design: MONAI masks the all-zero voxels, segloss the
# elements equal to the sentinel; the one-channel case, where both agree, is tested below)
@pytest.mark.parametrize(
    "form, ignore_index", [("labels", None), ("labels", 2), ("labels", 255), ("one_hot", None), ("one_hot", 2)]
)
def test_matches_monai(spatial, use_softmax, include_background, form, ignore_index):
    """Every (alpha, weight, gamma, reduction) combination: value and input gradient equal MONAI 1.6.1."""
    x = torch.randn(B, C, *spatial) * 2
    lab = torch.randint(0, C, (B, 1, *spatial))
    if ignore_index == 255:
        lab[0, 0, :2] = 255
    target = lab if form == "labels" else one_hot(lab[:, 0], C)
    n = C if include_background else C - 1
    for alpha, weight, gamma, reduction in itertools.product(ALPHAS, WEIGHTS, [0.0, 2.0], ["mean", "sum", "none"]):
        kw = dict(
            include_background=include_background,
            to_onehot_y=form == "labels",
            gamma=gamma,
            alpha=per_class(alpha, n, [0.1, 0.6, 0.3, 0.8]),
            weight=per_class(weight, n, [1.0, 2.0, 0.5, 3.0]),
            reduction=reduction,
            use_softmax=use_softmax,
            ignore_index=ignore_index,
        )
        upstream = torch.rand(B, n, *spatial) if reduction == "none" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's and segloss's "scalar alpha ignored" warning
            ref, ref_grad = value_and_grad(monai.losses.FocalLoss(**kw), x, target, upstream)
            out, grad = value_and_grad(FocalLoss(**kw), x, target, upstream)
        msg = f"{kw}"
        assert out.shape == ref.shape, msg
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=msg)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5, msg=msg)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_sentinel_ignore_matches_monai(reduction):
    x = torch.randn(3, 1, 6, 5)
    m = (torch.rand(3, 1, 6, 5) > 0.5).float()
    m[0, 0, :2] = 255
    kw = dict(ignore_index=255, alpha=0.25, weight=2.0, reduction=reduction)
    ref, ref_grad = value_and_grad(monai.losses.FocalLoss(**kw), x, m)
    out, grad = value_and_grad(FocalLoss(**kw), x, m)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
def test_custom_backward_gradcheck(gamma):
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 7))
    assert torch.autograd.gradcheck(lambda z: _SoftmaxFocalAtLabel.apply(z, labels, gamma), (logits,))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_custom_backward_near_certain_voxels(gamma):
    """p_t -> 1 (the 0/0 in log p / (1 - p)) and p_t -> 0 against autograd of the float64 formula."""
    logits = torch.randn(2, 3, 6, dtype=torch.float64) * torch.tensor([0.0, 5.0, 20.0, 40.0, 80.0, 200.0])
    logits.requires_grad_()
    labels = logits.detach().argmax(1)
    labels[0, -2:] = logits.detach()[0].argmin(0)[-2:]  # two hopeless voxels
    upstream = torch.rand(2, 6, dtype=torch.float64)
    (g,) = torch.autograd.grad((_SoftmaxFocalAtLabel.apply(logits, labels, gamma) * upstream).sum(), logits)
    logp_t = logits.log_softmax(1).gather(1, labels[:, None])[:, 0]
    ref = -(-torch.expm1(logp_t)).pow(gamma) * logp_t
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), logits)
    assert torch.isfinite(g).all()
    # autograd of the formula is 0 * inf = NaN where p_t rounds to 1 and gamma < 1; the true limit is 0
    certain = ~torch.isfinite(g_ref)
    assert torch.equal(g[certain], torch.zeros_like(g[certain]))
    torch.testing.assert_close(g[~certain], g_ref[~certain])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
@pytest.mark.parametrize("start", [0, 1])
@pytest.mark.parametrize("with_factors", [False, True])
@pytest.mark.parametrize("per_element", [False, True])
def test_sigmoid_custom_backward_gradcheck(gamma, start, with_factors, per_element):
    logits = (torch.randn(2, 4, 7, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, 4, (2, 7))
    factors = torch.rand(2, 4 - start, dtype=torch.float64) + 0.1 if with_factors else None
    fn = lambda z: _SigmoidFocalAtLabel.apply(z, labels, gamma, start, factors, per_element)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_sigmoid_custom_backward_large_logits(gamma):
    """|logit| up to 1e4 (float32): values and gradients finite and equal to autograd of the float64 formula
    ``softplus(z) sigmoid(z)^gamma`` wherever that one is finite (NaN where sigmoid(z)^gamma, gamma < 1, has an
    infinite slope at sigmoid(z) = 0)."""
    x = torch.randn(2, 3, 6) * torch.tensor([0.0, 5.0, 20.0, 90.0, 1e3, 1e4])
    labels = torch.randint(0, 3, (2, 6))
    factors = torch.tensor([[0.3, 0.6, 0.9], [1.0, 2.0, 0.5]])
    upstream = torch.rand(2, 3, 6)
    x1 = x.clone().requires_grad_()
    out = _SigmoidFocalAtLabel.apply(x1, labels, gamma, 0, factors, True)
    (g,) = torch.autograd.grad((out * upstream).sum(), x1)
    x2 = x.double().requires_grad_()
    pos = one_hot(labels, 3).bool()
    a = torch.where(pos, factors[0].double().view(3, 1), factors[1].double().view(3, 1))
    z = torch.where(pos, -x2, x2)
    ref = a * F.softplus(z) * torch.sigmoid(z) ** gamma
    (g_ref,) = torch.autograd.grad((ref * upstream.double()).sum(), x2)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    close64(out, ref.detach())
    ok = torch.isfinite(g_ref)
    assert ok.float().mean() > 0.7
    torch.testing.assert_close(g[ok].double(), g_ref[ok], rtol=1e-5, atol=1e-6)


def test_sigmoid_blocks_give_the_same_result(monkeypatch):
    """Column blocks (as on large volumes: here 131 + 79 columns per channel) give the one-block value and
    gradient."""
    x = torch.randn(2, 5, 5, 6, 7)
    lab = torch.randint(0, 5, (2, 1, 5, 6, 7))
    loss = FocalLoss(to_onehot_y=True, include_background=False, alpha=[0.2, 0.5, 0.7, 0.9], weight=2.0)
    for reduction, upstream in (("mean", None), ("none", torch.rand(2, 4, 5, 6, 7))):
        loss.reduction = reduction
        a, ga = value_and_grad(loss, x, lab, upstream)
        monkeypatch.setattr(fused_module, "_MIN_BLOCK", 16)
        b, gb = value_and_grad(loss, x, lab, upstream)
        monkeypatch.undo()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


def focal64(x, g, gamma, alpha_c=None, softmax=True, drop_bg=False, over_all=False):
    """float64 focal loss per element (B,n,*) with a one-hot / multi-label target g."""
    x, g = x.double(), g.double()
    if softmax:
        logp = x[:, 1:].log_softmax(1) if drop_bg and not over_all else x.log_softmax(1)[:, int(drop_bg) :]
        g = g[:, int(drop_bg) :]
        loss = -((1 - logp.exp()) ** gamma) * logp * g
    else:
        p = torch.sigmoid(x)
        pt = torch.where(g == 1, p, 1 - p)
        loss = -((1 - pt) ** gamma) * torch.log(pt)
    if alpha_c is not None:
        loss = loss * torch.tensor(alpha_c, dtype=torch.float64).view(1, -1, *([1] * (x.ndim - 2)))
    return loss


@pytest.mark.parametrize("alpha", [None, 0.25, [0.2, 0.5, 0.9]])
@pytest.mark.parametrize("form", ["labels", "one_hot"])
def test_softmax_over_all_channels(alpha, form):
    x = torch.randn(B, C, 6, 5)
    lab = torch.randint(0, C, (B, 1, 6, 5))
    target = lab if form == "labels" else one_hot(lab[:, 0], C)
    out = FocalLoss(include_background=False, use_softmax=True, alpha=alpha, softmax_over_all_channels=True)(x, target)
    alpha_c = [alpha] * (C - 1) if isinstance(alpha, float) else alpha
    ref = focal64(x, one_hot(lab[:, 0], C), 2.0, alpha_c, drop_bg=True, over_all=True).mean()
    close64(out, ref)
    monai_style = FocalLoss(include_background=False, use_softmax=True, alpha=[0.2, 0.5, 0.9])(x, target)
    assert not torch.allclose(
        monai_style,
        FocalLoss(include_background=False, use_softmax=True, alpha=[0.2, 0.5, 0.9], softmax_over_all_channels=True)(
            x, target
        ),
    )


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_weight_map_and_options_against_float64(use_softmax, ignore, spatial):
    x = torch.randn(B, C, *spatial) * 2
    lab = torch.randint(0, C, (B, 1, *spatial))
    wm = torch.rand(B, 1, *spatial) * 3
    v = wm.double()
    if ignore:
        lab[1, 0, 0] = 255
        v = v * (lab != 255)
    g = one_hot(lab.clamp(max=C - 1)[:, 0], C)
    loss = focal64(x, g, 1.5, softmax=use_softmax) * v  # (B, C, *)
    dims = tuple(range(2, x.ndim))
    kw = dict(gamma=1.5, use_softmax=use_softmax, ignore_index=255 if ignore else None, to_onehot_y=True)
    # "mean": sum / (C V), or / V with ignore_index (MONAI); ce_mean: / V softmax, / (C V) sigmoid
    k = 1 if ignore else C
    close64(FocalLoss(**kw)(x, lab, weight_map=wm), loss.sum() / (k * v.sum()))
    k = 1 if use_softmax else C
    close64(FocalLoss(**kw, ce_mean=True)(x, lab, weight_map=wm), loss.sum() / (k * v.sum()))
    # "sum": per (sample, channel) weighted spatial mean, summed; or the plain sum
    ref = (loss.sum(dims) / v.sum(dims)).sum()
    close64(FocalLoss(**kw, reduction="sum")(x, lab, weight_map=wm), ref)
    out = FocalLoss(**kw, reduction="sum", average_spatial_dims=False)(x, lab, weight_map=wm)
    close64(out, loss.sum())
    close64(FocalLoss(**kw, reduction="none")(x, lab, weight_map=wm), loss)


def test_ce_mean_gamma0_equals_cross_entropy():
    x = torch.randn(B, C, 5, 6, 3)
    lab = torch.randint(0, C, (B, 1, 5, 6, 3))
    softmax = FocalLoss(gamma=0.0, use_softmax=True, ce_mean=True, to_onehot_y=True)
    torch.testing.assert_close(softmax(x, lab), F.cross_entropy(x, lab[:, 0]))
    lab[0, 0, 0] = 255
    softmax = FocalLoss(gamma=0.0, use_softmax=True, ce_mean=True, to_onehot_y=True, ignore_index=255)
    torch.testing.assert_close(softmax(x, lab), F.cross_entropy(x, lab[:, 0], ignore_index=255))
    g = (torch.rand(B, C, 5, 6, 3) > 0.5).float()
    torch.testing.assert_close(FocalLoss(gamma=0.0, ce_mean=True)(x, g), F.binary_cross_entropy_with_logits(x, g))
    g[0, 0, 0] = 255
    keep = g != 255
    bce = F.binary_cross_entropy_with_logits(x[keep], g[keep])
    torch.testing.assert_close(FocalLoss(gamma=0.0, ce_mean=True, ignore_index=255)(x, g), bce)


def test_per_class_weight_map_with_dense_target():
    x = torch.randn(B, C, 6, 6)
    g = (torch.rand(B, C, 6, 6) > 0.5).float()
    wm = torch.rand(B, C, 6, 6)
    loss = focal64(x, g, 2.0, softmax=False)
    out = FocalLoss(include_background=False, reduction="none")(x, g, weight_map=wm)
    close64(out, loss[:, 1:] * wm[:, 1:].double())
    out = FocalLoss(include_background=False)(x, g, weight_map=wm)
    close64(out, (loss[:, 1:] * wm[:, 1:]).sum() / wm[:, 1:].double().sum())


@pytest.mark.parametrize("use_softmax", [False, True])
def test_labels_equal_one_hot_with_all_options(use_softmax):
    x = torch.randn(B, C, 4, 5, 3)
    lab = torch.randint(0, C, (B, 1, 4, 5, 3))
    wm = torch.rand(B, 1, 4, 5, 3)
    for over_all, red in itertools.product([False, True], ["mean", "sum", "none"]):
        kw = dict(include_background=False, alpha=[0.3, 0.6, 0.9], weight=[1.0, 2.0, 3.0], use_softmax=use_softmax)
        kw.update(softmax_over_all_channels=over_all, reduction=red, average_spatial_dims=False, ce_mean=True)
        loss = FocalLoss(**kw)
        a, ga = value_and_grad(lambda z, t: loss(z, t, weight_map=wm), x, lab)  # noqa: B023
        b, gb = value_and_grad(lambda z, t: loss(z, t, weight_map=wm), x, one_hot(lab[:, 0], C))  # noqa: B023
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fully_ignored_is_zero_with_zero_grad(use_softmax, reduction):
    x = torch.randn(B, C, 4, 4, requires_grad=True)
    out = FocalLoss(use_softmax=use_softmax, ignore_index=255, reduction=reduction)(x, torch.full((B, 1, 4, 4), 255))
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, x)
    assert torch.equal(g, torch.zeros_like(g))


def test_warnings_as_monai():
    x, lab = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 1, 4, 4))
    with pytest.warns(UserWarning, match="scalar `alpha` ignored"):
        FocalLoss(include_background=False, use_softmax=True, alpha=0.25)(x, lab)
    with pytest.warns(UserWarning, match="include_background=False"):
        FocalLoss(include_background=False)(torch.randn(2, 1, 4, 4), torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize(
    "kwargs, input, target, fwd, match",
    [
        ({}, torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 1, 4, 5)), {}, "target"),
        ({"to_onehot_y": True}, torch.randn(2, 3, 4, 4), torch.full((2, 1, 4, 4), 3), {}, "target"),
        ({"use_softmax": True}, torch.randn(2, 3, 4, 4), torch.full((2, 1, 4, 4), -1), {}, "target"),
        ({}, torch.randn(2, 3, 4, 4), torch.full((2, 1, 4, 4), 0.5), {}, "non-integer"),
        ({}, torch.randn(2, 3, 4, 4), torch.rand(2, 2, 4, 4), {}, "target"),
        ({}, torch.full((2, 3, 4, 4), float("nan")), torch.zeros(2, 1, 4, 4), {}, "input"),
        ({"use_softmax": True}, torch.full((2, 3, 4, 4), float("-inf")), torch.zeros(2, 1, 4, 4), {}, "input"),
        ({}, torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), {"weight_map": torch.ones(2, 1, 4, 3)}, "weight_map"),
        ({"alpha": [0.1, 0.2]}, torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), {}, "alpha"),
        (
            {"weight": [1.0, 2.0, 3.0], "include_background": False},
            torch.randn(2, 3, 4, 4),
            torch.zeros(2, 1, 4, 4),
            {},
            "weight",
        ),
    ],
)
def test_bad_input_names_the_argument(kwargs, input, target, fwd, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss(**kwargs)(input, target, **fwd)


@pytest.mark.parametrize("include_background", [True, False])
def test_softmax_label_path_checks_its_loss_not_the_input(include_background):
    """NaN/Inf in the input are found in the loss: NaN and +Inf raise, -Inf at a class other than the label is a
    probability of 0 (the loss of a very negative logit), -Inf at the label raises. Without background MONAI's
    softmax leaves channel 0 out of the loss, so its logits are not read."""
    loss = FocalLoss(use_softmax=True, include_background=include_background)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    lab = torch.randint(1, 3, (2, 1, 4, 4), generator=g)
    lab[:, :, :2] = 1  # class 2 is not the label there: its logits may be -Inf
    masked, very_negative = x.clone(), x.clone()
    masked[:, 2, :2] = float("-inf")
    very_negative[:, 2, :2] = -1e4
    value = loss(masked.requires_grad_(), lab)
    value.backward()
    torch.testing.assert_close(value, loss(very_negative, lab), rtol=0, atol=0)
    assert torch.isfinite(masked.grad).all()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input"):
            loss(x.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(3)), torch.tensor(bad)), lab)
    at_label = x.clone()
    at_label[0, lab[0, 0, 0, 0], 0, 0] = float("-inf")
    with pytest.raises(ValueError, match="input"):
        loss(at_label, lab)
    if not include_background:  # channel 0 is not read
        unread = x.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(float("nan")))
        torch.testing.assert_close(loss(unread, lab), loss(x, lab), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": [0.5, -0.1]}, "alpha"),
        ({"weight": [1.0, -1.0]}, "weight"),
        ({"gamma": -1.0}, "gamma"),
        ({"reduction": "avg"}, "reduction"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss(**kwargs)


def test_functional_checks_options():
    x, lab = torch.randn(1, 2, 3), torch.zeros(1, 3)
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(x, lab, alpha=-0.5)
    with pytest.raises(ValueError, match="weight"):
        focal_loss(x, lab, weight=[1.0, -2.0])


def test_metatensor_inputs():
    x = torch.randn(2, 3, 5, 5)
    lab = torch.randint(0, 3, (2, 1, 5, 5)).float()
    loss = FocalLoss(use_softmax=True, to_onehot_y=True)
    xm = MetaTensor(x.clone()).requires_grad_()
    out = loss(xm, MetaTensor(lab))
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, loss(x, lab))
    out.backward()
    assert torch.isfinite(xm.grad).all()


@pytest.mark.parametrize("use_softmax", [False, True])
def test_batch_of_one_and_bf16_autocast(use_softmax):
    x = torch.randn(1, 3, 16, 16)
    lab = torch.randint(0, 3, (1, 1, 16, 16))
    loss = FocalLoss(use_softmax=use_softmax, to_onehot_y=True, alpha=[0.2, 0.5, 0.8])
    ref = loss(x, lab)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(xb, lab, weight_map=torch.ones(1, 1, 16, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-3)
    out.backward()
    assert torch.isfinite(xb.grad.float()).all()


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.0, 100.0),
    gamma=st.floats(0.0, 5.0),
    use_softmax=st.booleans(),
    include_background=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gradients_are_finite(scale, gamma, use_softmax, include_background, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 3, 5, 5, generator=gen) * scale).requires_grad_()
    lab = torch.randint(0, 3, (2, 1, 5, 5), generator=gen)
    loss = FocalLoss(include_background=include_background, gamma=gamma, use_softmax=use_softmax, to_onehot_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = loss(x, lab, weight_map=torch.rand(2, 1, 5, 5, generator=gen))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


def _big_allocations(loss_fn, x, target, **kw):
    """Distinct float storages of at least (B, C - 1, N) elements other than the input's allocated by forward,
    then backward."""
    counts, numel = [], x.numel() // x.shape[1] * (x.shape[1] - 1)
    with _BigFloatAllocations(numel) as mode:
        value = loss_fn(x, target, **kw)
    counts.append(len(mode.storages - {x.untyped_storage().data_ptr()}))
    with _BigFloatAllocations(numel) as mode:
        value.backward()
    counts.append(len(mode.storages - {x.untyped_storage().data_ptr()}))
    return counts


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(gamma=0.5, alpha=0.25, reduction="sum"),
        dict(include_background=False, alpha=[0.1, 0.2, 0.3, 0.4], weight=2.0, ignore_index=255),
    ],
)
def test_sigmoid_label_map_allocates_only_the_gradient(kwargs):
    """Sigmoid focal on an integer label map: no (B, C, N) float tensor in forward, one (the input gradient) in
    backward. Autograd through the formula on a one-hot target allocates about 7 and 10 (checked below)."""
    B, C, spatial = 2, 5, (8, 9, 10)
    x = torch.randn(B, C, *spatial)
    lab = torch.randint(0, C, (B, 1, *spatial))
    lab[0, 0, 0] = 255 if "ignore_index" in kwargs else 0
    wm = torch.rand(B, 1, *spatial)
    loss = FocalLoss(to_onehot_y=True, **kwargs)
    assert _big_allocations(loss, x.clone().requires_grad_(), lab, weight_map=wm) == [0, 1]
    onehot = one_hot(lab[:, 0].clamp(max=C - 1), C)
    fwd, bwd = _big_allocations(FocalLoss(**kwargs), x.clone().requires_grad_(), onehot, weight_map=wm)
    assert fwd >= 4 and bwd >= 4
