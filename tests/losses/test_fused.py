"""The fused-path switch and the first-order guard: second derivatives raise on a fused path and are right on the
plain ones."""

import monai.losses as ml
import pytest
import torch
import torch.nn.functional as F

import segloss
from segloss.losses import set_fused_paths

LABEL_LOSSES = {
    "dice": (segloss.DiceLoss(to_onehot_y=True, softmax=True), ml.DiceLoss(to_onehot_y=True, softmax=True)),
    "dice_ce": (segloss.DiceCELoss(to_onehot_y=True, softmax=True), ml.DiceCELoss(to_onehot_y=True, softmax=True)),
    "tversky": (segloss.TverskyLoss(to_onehot_y=True, softmax=True), ml.TverskyLoss(to_onehot_y=True, softmax=True)),
    "focal_softmax": (
        segloss.FocalLoss(to_onehot_y=True, use_softmax=True),
        ml.FocalLoss(to_onehot_y=True, use_softmax=True),
    ),
    "focal_sigmoid": (segloss.FocalLoss(to_onehot_y=True, alpha=0.25), ml.FocalLoss(to_onehot_y=True, alpha=0.25)),
    "dice_focal": (
        segloss.DiceFocalLoss(to_onehot_y=True, softmax=True),
        ml.DiceFocalLoss(to_onehot_y=True, softmax=True),
    ),
    "cross_entropy": (segloss.WeightedCrossEntropyLoss(), lambda x, y: F.cross_entropy(x, y[:, 0])),
}


@pytest.fixture
def plain_paths():
    set_fused_paths(False)
    yield
    set_fused_paths(True)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 5, 6, generator=g), torch.randint(0, 3, (2, 1, 5, 6), generator=g)


def _hvp(loss, x, y, v):
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x, y), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


@pytest.mark.parametrize("name", list(LABEL_LOSSES))
def test_fused_path_refuses_second_derivatives_clearly(name):
    x, y = _data()
    x.requires_grad_()
    loss = LABEL_LOSSES[name][0](x, y)
    with pytest.raises(RuntimeError, match="second derivatives.*set_fused_paths"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("name", list(LABEL_LOSSES))
def test_plain_path_second_derivatives_match_monai(name, plain_paths):
    x, y = _data()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ours, reference = LABEL_LOSSES[name]
    g1, h1 = _hvp(ours, x, y, v)
    g2, h2 = _hvp(reference, x, y, v)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=1e-4)
    assert h1.abs().sum() > 0


def test_lovasz_second_derivative_is_exact():
    # the hinge errors are linear in the logits and the increments constant: the Hessian is 0 (a.e.)
    x, y = _data()
    v = torch.randn(x.shape)
    g, h = _hvp(segloss.LovaszHingeLoss(), x, y, v)
    assert g.abs().sum() > 0
    torch.testing.assert_close(h, torch.zeros_like(h))


def test_switch_keeps_values_and_gradients():
    x, y = _data()
    for ours, _ in LABEL_LOSSES.values():
        grads = []
        for fused in (True, False):
            set_fused_paths(fused)
            xx = x.clone().requires_grad_()
            value = ours(xx, y)
            grads.append((value.detach(), torch.autograd.grad(value, xx)[0]))
        set_fused_paths(True)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


COMPILED = {
    "dice": segloss.DiceLoss(to_onehot_y=True, softmax=True),
    "generalized_dice": segloss.GeneralizedDiceLoss(to_onehot_y=True, softmax=True),
    "tversky": segloss.TverskyLoss(to_onehot_y=True, softmax=True),
    "dice_ce": segloss.DiceCELoss(to_onehot_y=True, softmax=True),
    "dice_focal": segloss.DiceFocalLoss(to_onehot_y=True, softmax=True),
    "focal": segloss.FocalLoss(to_onehot_y=True, use_softmax=True),
    "focal_sigmoid": segloss.FocalLoss(to_onehot_y=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMPILED))
def test_torch_compile_gives_the_eager_value_and_gradient(name):
    # torch.jit.script is not supported (docs/losses.md); torch.compile is
    torch._dynamo.reset()
    loss = COMPILED[name]
    x, y = _data()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = torch.compile(loss, backend="aot_eager")(x1, y)
    want = loss(x2, y)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x1)[0], torch.autograd.grad(want, x2)[0])
