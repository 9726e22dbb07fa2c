"""The shared input path: target forms, ignore masks, per-class sums, validation."""

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from segloss.losses.class_sums import class_sums
from segloss.losses.inputs import activate, prepare_target, reduce_loss


def _naive_sums(p, onehot, w):
    """float64 reference: tp, pred_sum, target_sum over spatial dims."""
    p, onehot, w = p.double(), onehot.double(), w.double()
    dims = tuple(range(2, p.ndim))
    return (p * onehot * w).sum(dims), (p * w).sum(dims), (onehot * w).sum(dims)


@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 3)])
@pytest.mark.parametrize("squared_pred", [False, True])
@pytest.mark.parametrize("label_form", ["b1", "b", "float"])
def test_label_map_sums_match_one_hot_reference(spatial, squared_pred, label_form):
    B, C = 2, 4
    p = torch.rand(B, C, *spatial).softmax(1)
    lab = torch.randint(0, C, (B, *spatial))
    wm = torch.rand(B, 1, *spatial)
    target = {"b1": lab[:, None], "b": lab, "float": lab[:, None].float()}[label_form]
    t = prepare_target(p, target, weight_map=wm)
    assert t.is_labels and t.dense is None
    tp, ps, ts = class_sums(p, t, squared_pred=squared_pred)
    onehot = F.one_hot(lab, C).movedim(-1, 1)
    _, rps, rts = _naive_sums(p * p if squared_pred else p, onehot, wm)
    rtp = _naive_sums(p, onehot, wm)[0]  # tp is sum p*g also with squared_pred (g*g == g)
    torch.testing.assert_close(tp.double(), rtp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ps.double(), rps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ts.double(), rts, rtol=1e-5, atol=1e-5)


def test_label_and_dense_paths_agree_with_ignore_and_batch():
    B, C = 3, 3
    p = torch.rand(B, C, 5, 5).softmax(1)
    lab = torch.randint(0, C, (B, 1, 5, 5))
    lab[0, 0, :2] = 255
    t_lab = prepare_target(p, lab, ignore_index=255)
    onehot = F.one_hot(lab.clamp(max=C - 1)[:, 0], C).movedim(-1, 1).float()
    onehot = onehot * (lab != 255)
    wm = (lab != 255).float()
    t_dense = prepare_target(p, onehot, weight_map=wm)
    for batch in (False, True):
        a = class_sums(p, t_lab, batch=batch)
        b = class_sums(p, t_dense, batch=batch)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)
        assert a[0].shape == ((C,) if batch else (B, C))


def test_label_map_gradient_matches_dense():
    p = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 3, (2, 1, 4, 4))
    onehot = F.one_hot(lab[:, 0], 3).movedim(-1, 1).double()
    g1 = torch.autograd.grad(sum(s.sum() * (i + 1) for i, s in enumerate(class_sums(p, prepare_target(p, lab)))), p)
    g2 = torch.autograd.grad(sum(s.sum() * (i + 1) for i, s in enumerate(class_sums(p, prepare_target(p, onehot)))), p)
    torch.testing.assert_close(g1[0], g2[0])


def test_metatensor_inputs_and_float_labels():
    p = MetaTensor(torch.rand(1, 2, 4, 4))
    lab = MetaTensor(torch.randint(0, 2, (1, 1, 4, 4)).float())
    t = prepare_target(p, lab)
    assert type(t.labels) is torch.Tensor and t.labels.dtype == torch.int64


def test_sums_are_float32_under_autocast():
    p = torch.rand(1, 2, 300, 300).softmax(1).bfloat16()
    lab = torch.randint(0, 2, (1, 1, 300, 300))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = prepare_target(p, lab, weight_map=torch.ones(1, 1, 300, 300))
        sums = class_sums(p, t)
    assert all(s.dtype == torch.float32 for s in sums)
    torch.testing.assert_close(sums[2].sum(), torch.tensor(90000.0))


@pytest.mark.parametrize(
    "target, kwargs, match",
    [
        (torch.randint(0, 3, (2, 1, 4, 5)), {}, "target"),  # wrong spatial size
        (torch.full((2, 1, 4, 4), 3), {}, r"\[0, 3\)"),  # label == C
        (torch.full((2, 1, 4, 4), -1), {}, "target"),  # negative label
        (torch.full((2, 1, 4, 4), 0.5), {}, "non-integer"),  # fractional label
        (torch.rand(2, 2, 4, 4), {}, "target"),  # dense with the wrong channel count
        (torch.zeros(2, 1, 4, 4), {"weight_map": -torch.ones(2, 1, 4, 4)}, "weight_map"),
        (torch.zeros(2, 1, 4, 4), {"weight_map": torch.ones(2, 1, 3, 4)}, "weight_map"),
    ],
)
def test_bad_targets_name_the_argument(target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare_target(torch.rand(2, 3, 4, 4), target, **kwargs)


def test_ignore_index_allows_out_of_range_sentinel():
    lab = torch.full((1, 1, 4, 4), 255)
    lab[..., 0, 0] = 1
    t = prepare_target(torch.rand(1, 3, 4, 4), lab, ignore_index=255)
    assert t.weight.sum() == 1 and int(t.labels.max()) == 1


def test_dense_sentinel_ignore_is_elementwise_for_multilabel():
    target = torch.tensor([[[[0.0, 1.0], [255.0, 1.0]]], [[[1.0, 255.0], [0.0, 0.0]]]]).reshape(1, 2, 2, 2)
    t = prepare_target(torch.rand(1, 2, 2, 2), target, ignore_index=255)
    assert t.weight.shape == (1, 2, 4)
    assert t.weight.sum() == 6 and float(t.dense.max()) == 1.0


def test_activate_and_reduction():
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(activate(x, softmax=True).sum(1), torch.ones(2, 4))
    with pytest.warns(UserWarning, match="softmax"):
        activate(torch.randn(2, 1, 4), softmax=True)
    f = torch.rand(2, 3)
    assert reduce_loss(f, "none", spatial_ndim=3).shape == (2, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="reduction"):
        reduce_loss(f, "avg")


def test_prepared_target_is_reused_and_checked_against_the_input():
    x = torch.randn(2, 3, 5, 4)
    lab = torch.randint(0, 3, (2, 1, 5, 4))
    tgt = prepare_target(x, lab, ignore_index=2)
    assert prepare_target(x, tgt) is tgt
    for other in (torch.randn(2, 4, 5, 4), torch.randn(2, 3, 5, 5), torch.randn(3, 3, 5, 4)):
        with pytest.raises(ValueError, match="prepared `target`"):
            prepare_target(other, tgt)
    with pytest.raises(ValueError, match="weight_map"):
        prepare_target(x, tgt, weight_map=torch.ones(2, 1, 5, 4))


def test_one_channel_mask_without_channel_axis_is_dense():
    x = torch.randn(2, 1, 5, 4)
    mask = (torch.rand(2, 5, 4) > 0.5).float()
    tgt = prepare_target(x, mask)
    assert not tgt.is_labels and torch.equal(tgt.dense, mask.reshape(2, 1, -1))


@pytest.mark.parametrize(
    "loss_kwargs, target_kind",
    [
        (("ce", dict(softmax=True)), "onehot"),  # dense target: the non-fused CE path
        (("ce", dict(softmax=True, label_smoothing=0.1)), "labels"),
        (("ce", dict(sigmoid=True, sigmoid_ce=True)), "onehot"),
        (("focal", dict(softmax=True)), "labels"),
        (("focal", dict(sigmoid=True)), "onehot"),
    ],
)
def test_compound_losses_prepare_the_target_once(monkeypatch, loss_kwargs, target_kind):
    from segloss import DiceCELoss, DiceFocalLoss
    from segloss.losses import inputs

    calls = []
    for reader in ("_read_label_map", "_read_dense"):
        real = getattr(inputs, reader)
        monkeypatch.setattr(inputs, reader, lambda *a, real=real, reader=reader: (calls.append(reader), real(*a))[1])
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    lab = torch.randint(0, 3, (2, 1, 6, 5))
    target = lab if target_kind == "labels" else F.one_hot(lab[:, 0], 3).movedim(-1, 1).float()
    name, kwargs = loss_kwargs
    loss = (DiceCELoss if name == "ce" else DiceFocalLoss)(**kwargs)
    loss(x, target).backward()
    # the target was read (and checked) once for both terms
    assert calls == (["_read_label_map"] if target_kind == "labels" else ["_read_dense"])


@pytest.mark.parametrize("n", [5, 8, 11, 12])  # with 4-voxel blocks: one row per item; blocks; blocks + a tail
@pytest.mark.parametrize("weighted", [False, True])
def test_sum_by_label_matches_bincount_with_gradient(monkeypatch, n, weighted):
    from segloss.losses import class_sums as inputs

    monkeypatch.setattr(inputs, "_ROW", 4)
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, 3, (2, n), generator=g)
    values = torch.rand(2, n, generator=g, dtype=torch.float64, requires_grad=True) if weighted else None
    got = inputs.sum_by_label(labels, values, 3)
    for b in range(2):
        want = torch.bincount(labels[b], None if values is None else values[b].detach(), minlength=3)
        torch.testing.assert_close(got[b], want.to(got.dtype))
    if weighted:
        assert torch.autograd.gradcheck(lambda v: inputs.sum_by_label(labels, v, 3), (values,))
    else:
        assert got.dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 4)])
def test_empty_input_raises_value_error_naming_input(shape):
    with pytest.raises(ValueError, match="`input` of shape .* is empty"):
        prepare_target(torch.randn(shape), torch.zeros(shape[0], 1, *shape[2:], dtype=torch.long))


def test_every_loss_rejects_an_empty_batch_clearly():
    import segloss

    x, y = torch.randn(0, 3, 8, 8), torch.zeros(0, 1, 8, 8, dtype=torch.long)
    losses = [
        segloss.DiceLoss(softmax=True),
        segloss.GeneralizedDiceLoss(softmax=True),
        segloss.TverskyLoss(softmax=True),
        segloss.FocalTverskyLoss(softmax=True),
        segloss.DiceCELoss(softmax=True),
        segloss.DiceFocalLoss(softmax=True),
        segloss.FocalLoss(),
        segloss.WeightedCrossEntropyLoss(),
        segloss.LovaszSoftmaxLoss(),
        segloss.LovaszHingeLoss(),
        segloss.SkeletonRecallLoss(softmax=True),
    ]
    for loss in losses:
        with pytest.raises(ValueError, match="is empty"):
            loss(x, y)


def test_classification_shaped_input_is_one_voxel_per_item():
    tgt = prepare_target(torch.randn(4, 3), torch.tensor([[0], [2], [1], [2]]))
    assert tgt.labels.shape == (4, 1) and tgt.spatial_shape == ()
