"""Skeletonize(d): 1-voxel-wide, topology-keeping per-class skeletons and tubes (2D and 3D)."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from skimage.measure import euler_number
from skimage.morphology import skeletonize

from segloss.transforms import Skeletonize, Skeletonized


def components(mask, full=True):
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if full else 1)
    return ndimage.label(mask, structure)[1]


def thick_line():
    lab = np.zeros((1, 32, 64), np.uint8)
    lab[0, 12:19, 5:59] = 1  # 7 rows thick, columns 5..58
    return lab


def test_thick_line_2d():
    skel = Skeletonize()(thick_line())[0]
    assert skel.dtype == np.uint8 and set(np.unique(skel)) == {0, 1}
    on = skel > 0
    assert components(on) == 1
    assert np.array_equal(skeletonize(on), on)  # already thin: thinning removes nothing
    assert np.all(on[:, 10:54].sum(0) == 1)  # one voxel per column away from the ends
    cols = np.nonzero(on.any(0))[0]
    assert cols.min() <= 5 + 4 and cols.max() >= 58 - 4  # endpoints near the line's ends


def test_ring_keeps_hole():
    yy, xx = np.mgrid[:48, :48]
    r = np.hypot(yy - 24, xx - 24)
    lab = ((r > 10) & (r < 17)).astype(np.int64)[None] * 2
    skel = Skeletonize()(lab)[0]
    assert set(np.unique(skel)) == {0, 2}
    assert euler_number(skel > 0, connectivity=2) == 0  # one component, one hole
    assert euler_number(lab[0] > 0, connectivity=2) == 0
    assert np.all((skel == 0) | (lab[0] == 2))


def test_tube_3d_and_torus():
    zz, yy, xx = np.mgrid[:40, :20, :20]
    tube = (np.hypot(yy - 10, xx - 10) < 4) & (zz >= 4) & (zz < 36)
    skel = Skeletonize()(tube[None].astype(np.int16))[0] > 0
    assert components(skel) == 1 and np.all(skel <= tube)
    assert np.all(skel[10:30].sum((1, 2)) == 1)  # a 1-voxel line along the tube's axis
    z = np.nonzero(skel.any((1, 2)))[0]
    assert z.min() <= 4 + 4 and z.max() >= 35 - 4
    # a torus keeps its tunnel: its skeleton is one closed loop (Euler number 0)
    zz, yy, xx = np.mgrid[:12, :40, :40]
    torus = np.hypot(np.hypot(yy - 20, xx - 20) - 12, zz - 6) < 4
    skel = Skeletonize()(torus[None].astype(np.uint8))[0] > 0
    assert components(skel) == 1 and euler_number(skel, connectivity=3) == 0


def test_multiclass_and_dilation():
    lab = thick_line().astype(np.int64)
    lab[0, 19:26, 5:59] = 3  # a touching second thick line of class 3
    skel = Skeletonize()(lab)[0]
    tube = Skeletonize(dilation=2)(lab)[0]
    for c in (1, 3):
        assert components(skel == c) == 1
        assert np.all((skel == c) <= (tube == c))  # skeleton voxels keep their class
        assert np.all((tube == c) <= (lab[0] == c))  # the tube never leaves its class
        assert components(tube == c) == 1
    assert np.all((tube == 1)[:, 15:50].sum(0) == 5)  # radius 2: 2 * 2 + 1 voxels per column
    assert set(np.unique(tube)) == {0, 1, 3}
    # thin lines (3 voxels): a radius-3 tube would spill over; it is cut at the class border instead
    thin = np.zeros((1, 20, 40), np.int64)
    thin[0, 8:11, 5:35], thin[0, 11:14, 5:35] = 1, 2
    skel, tube = Skeletonize()(thin)[0], Skeletonize(dilation=3)(thin)[0]
    np.testing.assert_array_equal(tube > 0, thin[0] > 0)  # fills exactly the two classes
    np.testing.assert_array_equal(tube, thin[0])
    assert np.all(tube[skel > 0] == skel[skel > 0])


def test_include_background_one_hot():
    lab = thick_line()
    out = Skeletonize(include_background=True, num_classes=3)(lab)
    assert out.shape == (3, 32, 64) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1], Skeletonize()(lab)[0])
    assert out[0].any() and not out[2].any()
    assert np.all(out[0] <= (lab[0] == 0))


def test_empty_and_containers_and_dict():
    np.testing.assert_array_equal(Skeletonize(dilation=1)(np.zeros((1, 6, 6), np.uint8)), np.zeros((1, 6, 6)))
    lab = thick_line()
    ref = Skeletonize(dilation=1)(lab)
    mt = MetaTensor(torch.from_numpy(lab).float(), affine=torch.eye(3) * 3, meta={"filename_or_obj": "s.png"})
    out = Skeletonize(dilation=1)(mt)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and torch.equal(out.affine, mt.affine)
    assert out.meta["filename_or_obj"] == "s.png"
    np.testing.assert_array_equal(out.numpy(), ref)
    d = Skeletonized(keys="label", dilation=1)({"label": mt})
    assert d["label"] is mt and torch.equal(d["skeleton"], out)
    assert set(Skeletonized(keys=["label", "x"], skeleton_key=["s", "t"], allow_missing_keys=True)({"label": lab})) == {
        "label",
        "s",
    }
    with pytest.raises(KeyError):
        Skeletonized(keys="x")({"label": lab})
    with pytest.raises(ValueError, match="skeleton_key"):
        Skeletonized(keys=["a", "b"], skeleton_key="s")


@pytest.mark.parametrize(
    "kwargs, img, name",
    [
        ({}, np.zeros((6, 6)), "img"),
        ({}, np.full((1, 6, 6), 0.3), "img"),
        ({}, np.full((1, 6, 6), -1), "img"),
        ({"num_classes": 2}, np.full((1, 6, 6), 2), "num_classes"),
        ({"dilation": -1}, None, "dilation"),
        ({"dilation": 1.5}, None, "dilation"),
    ],
)
def test_bad_input(kwargs, img, name):
    with pytest.raises(ValueError, match=name):
        Skeletonize(**kwargs)(img)
