"""SkeletonRecallLoss against a float64 formula, on skeletons made with skimage (2D, 3D, multi-class)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import skeletonize

from segloss.losses import SkeletonRecallLoss


def blobs(shape, num_classes, seed=0):
    """A smooth random label map with classes 0..num_classes-1."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((num_classes, *shape)), sigma=2, axes=range(1, 1 + len(shape)))
    return field.argmax(0)


def tubed_skeleton(label, num_classes):
    """Per-class skeleton dilated by one voxel, holding the class value (0 elsewhere)."""
    skel = np.zeros_like(label)
    for c in range(1, num_classes):
        s = ndimage.binary_dilation(skeletonize(label == c)) & (label == c)
        skel[s] = c
    return skel


def skeleton_batch(batch, shape, num_classes):
    skel = np.stack([tubed_skeleton(blobs(shape, num_classes, seed=b), num_classes) for b in range(batch)])
    return torch.from_numpy(skel).long().unsqueeze(1)  # (B, 1, *spatial)


def reference(prob, skel_onehot, mask=None, batch=False, include_background=False, smooth=1.0):
    """1 - mean over (sample,) class of (sum p s m + smooth) / (sum s m + smooth), in float64."""
    p, s = prob.double(), skel_onehot.double()
    m = torch.ones_like(p[:, :1]) if mask is None else mask.double()
    dims = tuple(range(2, p.ndim))
    tp, ss = (p * s * m).sum(dims), (s * m).sum(dims)
    if batch:
        tp, ss = tp.sum(0), ss.sum(0)
    recall = (tp + smooth) / (ss + smooth)
    if not include_background and p.shape[1] > 1:
        recall = recall[..., 1:]
    return 1 - recall.mean()


def onehot(labels, num_classes):
    return F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize("batch", [False, True])
def test_2d_multiclass_label_map_and_onehot(batch):
    C = 4
    skel = skeleton_batch(2, (48, 48), C)
    assert all((skel == c).any() for c in range(1, C))
    logits = torch.randn(2, C, 48, 48)
    loss = SkeletonRecallLoss(softmax=True, batch=batch)
    expected = reference(torch.softmax(logits.double(), 1), onehot(skel, C), batch=batch)
    torch.testing.assert_close(loss(logits, skel).double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss(logits, onehot(skel, C)).double(), expected, rtol=1e-6, atol=1e-7)
    with_bg = SkeletonRecallLoss(softmax=True, batch=batch, include_background=True)(logits, skel)
    expected_bg = reference(torch.softmax(logits.double(), 1), onehot(skel, C), batch=batch, include_background=True)
    torch.testing.assert_close(with_bg.double(), expected_bg, rtol=1e-6, atol=1e-7)


def test_3d_binary_sigmoid_and_multiclass():
    skel = skeleton_batch(2, (20, 20, 20), 2)
    assert skel.sum() > 0
    logits = torch.randn(2, 1, 20, 20, 20)
    value = SkeletonRecallLoss(sigmoid=True)(logits, skel.float())  # one channel: the skeleton itself
    torch.testing.assert_close(value.double(), reference(torch.sigmoid(logits.double()), skel), rtol=1e-6, atol=1e-7)
    skel3 = skeleton_batch(1, (20, 20, 20), 3)
    logits3 = torch.randn(1, 3, 20, 20, 20)
    assert (skel3 == 1).any() and (skel3 == 2).any()
    value3 = SkeletonRecallLoss(softmax=True)(logits3, skel3)
    torch.testing.assert_close(
        value3.double(), reference(torch.softmax(logits3.double(), 1), onehot(skel3, 3)), rtol=1e-6, atol=1e-7
    )


def test_ignore_index_and_weight_map_mask():
    C = 3
    skel = skeleton_batch(2, (32, 32), C)
    ignored = torch.zeros_like(skel, dtype=torch.bool)
    ignored[..., :10, :] = True
    logits = torch.randn(2, C, 32, 32)
    prob = torch.softmax(logits.double(), 1)
    expected = reference(prob, onehot(skel.masked_fill(ignored, 0), C), mask=~ignored)
    value = SkeletonRecallLoss(softmax=True, ignore_index=255)(logits, skel.masked_fill(ignored, 255))
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    # nnU-Net's way: the mask comes from the segmentation, the skeleton keeps its values
    masked = SkeletonRecallLoss(softmax=True)(logits, skel, weight_map=(~ignored).float())
    torch.testing.assert_close(masked.double(), reference(prob, onehot(skel, C), mask=~ignored), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(masked, SkeletonRecallLoss(softmax=True)(logits, skel))


def test_reductions_smoothing_and_empty_class():
    C = 3
    skel = skeleton_batch(2, (32, 32), C)
    skel[skel == 2] = 0  # class 2 has no skeleton: recall 1, no cost
    logits = torch.randn(2, C, 32, 32)
    prob = torch.softmax(logits.double(), 1)
    none = SkeletonRecallLoss(softmax=True, reduction="none")(logits, skel)
    assert none.shape == (2, C - 1, 1, 1)
    assert torch.all(none[:, 1] == 0)
    total = SkeletonRecallLoss(softmax=True, reduction="sum")(logits, skel)
    torch.testing.assert_close(total, none.sum())
    value = SkeletonRecallLoss(softmax=True, smooth_nr=0.5, smooth_dr=0.5)(logits, skel)
    torch.testing.assert_close(value.double(), reference(prob, onehot(skel, C), smooth=0.5), rtol=1e-6, atol=1e-7)
    hard = SkeletonRecallLoss(softmax=True, smooth_nr=0.0, smooth_dr=0.0, reduction="none")(logits, skel)
    assert torch.isfinite(hard).all() and torch.all(hard[:, 1] == 1)  # empty class: recall 0 without smoothing


def test_gradient_only_on_skeleton_voxels():
    skel = skeleton_batch(1, (32, 32), 2)
    prob = torch.rand(1, 2, 32, 32, requires_grad=True)
    SkeletonRecallLoss(other_act=lambda x: x)(prob, skel).backward()
    on = skel[:, 0] == 1
    expected = -1.0 / (on.sum() + 1.0)  # d(1 - (tp+1)/(n+1))/dp on a skeleton voxel of the one used class
    torch.testing.assert_close(prob.grad[:, 1][on], torch.full((int(on.sum()),), float(expected)))
    assert torch.all(prob.grad[:, 1][~on] == 0) and torch.all(prob.grad[:, 0] == 0)


def test_autocast_gives_float32():
    skel = skeleton_batch(1, (32, 32), 2)
    logits = torch.randn(1, 2, 32, 32)
    ref = SkeletonRecallLoss(softmax=True)(logits, skel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = SkeletonRecallLoss(softmax=True)(logits.bfloat16(), skel)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref, rtol=1e-2, atol=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sync_batch"):
        SkeletonRecallLoss(sync_batch=True)
    with pytest.raises(ValueError, match="smooth_dr"):
        SkeletonRecallLoss(smooth_dr=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        SkeletonRecallLoss(reduction="max")
    with pytest.raises(ValueError, match="target"):
        SkeletonRecallLoss(softmax=True)(torch.randn(1, 2, 8, 8), torch.full((1, 1, 8, 8), 5))
    with pytest.raises(ValueError, match="input"):  # NaN softmax on the skeleton's voxels
        SkeletonRecallLoss(softmax=True)(torch.full((1, 2, 8, 8), float("inf")), torch.ones(1, 1, 8, 8))


def test_skeleton_keyword_replaces_target_inside_compound_loss():
    from segloss.losses import CompoundLoss, WeightedCrossEntropyLoss

    C = 3
    skel = skeleton_batch(2, (40, 40), C)
    label = torch.from_numpy(np.stack([blobs((40, 40), C, seed=b) for b in range(2)])).long().unsqueeze(1)
    logits = torch.randn(2, C, 40, 40)
    recall = SkeletonRecallLoss(softmax=True)
    compound = CompoundLoss({"ce": WeightedCrossEntropyLoss(), "skel": recall}, weights={"ce": 1.0, "skel": 2.0})
    value = compound(logits, label, skeleton=skel)
    expected_skel = reference(torch.softmax(logits.double(), 1), onehot(skel, C))
    torch.testing.assert_close(compound.last_terms["skel"].double(), expected_skel, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compound.last_terms["ce"], F.cross_entropy(logits, label[:, 0]))
    torch.testing.assert_close(value, compound.last_terms["ce"] + 2.0 * compound.last_terms["skel"])
    # without the keyword the target itself is read as the skeleton
    torch.testing.assert_close(recall(logits, skel), recall(logits, label, skeleton=skel))
