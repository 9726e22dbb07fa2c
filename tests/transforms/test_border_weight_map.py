"""BorderWeightMap(d) against the U-Net formula (Ronneberger et al. 2015) at known distances and a naive EDT."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from segloss.transforms import BorderWeightMap, BorderWeightMapd, balanced_class_weights


def border(d1, d2, w0=10.0, sigma=5.0):
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def two_squares_2d():
    """Instance ids 1, 2: squares whose facing edge voxels are 8 columns apart (cols 19 and 27)."""
    lab = np.zeros((1, 48, 64), np.int64)
    lab[0, 20:30, 10:20] = 1
    lab[0, 20:30, 27:37] = 2
    return lab


def naive(lab, object_labels=None, w0=10.0, sigma=5.0, spacing=None, class_weight="balanced"):
    """Float64 reference: one full EDT per object, sorted distances, formula on background voxels."""
    lab = lab[0]
    if object_labels is None:
        objects, ids, classes = lab, [i for i in np.unique(lab) if i != 0], (lab > 0).astype(int)
    else:
        objects, n = ndimage.label(np.isin(lab, object_labels))
        ids, classes = range(1, n + 1), lab
    wc = balanced_class_weights(np.bincount(classes.ravel()))[classes] if class_weight else np.ones(lab.shape)
    if len(ids) < 2:
        return wc
    dist = np.sort(np.stack([ndimage.distance_transform_edt(objects != i, sampling=spacing) for i in ids]), axis=0)
    return wc + w0 * np.exp(-((dist[0] + dist[1]) ** 2) / (2 * sigma**2)) * (objects == 0)


def test_gap_midpoint_2d():
    lab = two_squares_2d()
    w = BorderWeightMap(w0=10.0, sigma=5.0, class_weight=None)(lab)
    assert w.shape == lab.shape and w.dtype == np.float32
    assert w[0, 25, 23] == pytest.approx(1.0 + border(4, 4), rel=1e-6)  # d1 = d2 = gap / 2 = 4
    assert w[0, 25, 15] == 1.0  # object voxel: w_c only
    # balanced w_c: background weight N / (2 n_bg)
    n, n_fg = lab.size, 200
    w = BorderWeightMap(class_weight="balanced")(lab)
    assert w[0, 25, 23] == pytest.approx(n / (2 * (n - n_fg)) + border(4, 4), rel=1e-6)
    assert w[0, 25, 15] == pytest.approx(n / (2 * n_fg), rel=1e-6)


def test_gap_midpoint_3d_two_cubes():
    lab = np.zeros((1, 24, 24, 40), np.int64)
    lab[0, 8:16, 8:16, 4:12] = 3
    lab[0, 8:16, 8:16, 21:29] = 7  # facing faces at x = 11 and x = 21: midpoint x = 16, d1 = d2 = 5
    w = BorderWeightMap(w0=8.0, sigma=4.0, class_weight=None)(lab)
    assert w[0, 12, 12, 16] == pytest.approx(1.0 + border(5, 5, 8.0, 4.0), rel=1e-6)
    np.testing.assert_allclose(w[0], naive(lab, w0=8.0, sigma=4.0, class_weight=None), atol=1e-5)


def test_far_from_objects_is_class_weight():
    lab = np.zeros((1, 200, 64), np.int64)
    lab[0, 2:6, 10:20], lab[0, 2:6, 24:34] = 1, 2
    w = BorderWeightMap(sigma=3.0)(lab)
    wc_bg = balanced_class_weights(np.bincount((lab > 0).ravel()))[0]
    assert w[0, 150:].min() == w[0, 150:].max() == pytest.approx(wc_bg, rel=1e-6)


@pytest.mark.parametrize("spacing", [None, (2.0, 0.7)])
def test_matches_naive_edt_on_cells(spacing):
    """Binary mode on a Voronoi membrane image (cells = label 0 regions): cropped EDTs vs one EDT per cell."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 96, (25, 2))
    grid = np.stack(np.mgrid[:96, :96], -1)
    d = np.sort(np.linalg.norm(grid[:, :, None] - pts, axis=-1), axis=-1)
    lab = (d[..., 1] - d[..., 0] < 1.5).astype(np.uint8)[None]  # 1 = membrane between Voronoi cells
    w = BorderWeightMap(object_labels=[0], sigma=4.0, spacing=spacing)(lab)
    ref = naive(lab, object_labels=[0], sigma=4.0, spacing=spacing)
    assert ndimage.label(lab[0] == 0)[1] > 10
    np.testing.assert_allclose(w[0], ref, rtol=1e-5, atol=10.0 * 1e-6 + 1e-6)
    assert w[0][lab[0] == 1].max() > 5.0  # thin membranes between touching cells get most of w0


def test_anisotropic_spacing_at_midpoint():
    lab = np.zeros((1, 40, 20), np.int64)
    lab[0, 5:10, 5:15], lab[0, 17:22, 5:15] = 1, 2  # rows 9 and 17: midpoint row 13, 4 voxels each side
    w = BorderWeightMap(class_weight=None, spacing=(1.5, 1.0))(lab)
    assert w[0, 13, 10] == pytest.approx(1.0 + border(6.0, 6.0), rel=1e-6)


def test_instance_vs_binary_mode():
    lab = np.zeros((1, 32, 48), np.int64)
    lab[0, 10:20, 10:20], lab[0, 10:20, 20:30] = 1, 2  # touching instances
    lab[0, 10:20, 36:40] = 2  # a detached piece of instance 2
    inst = BorderWeightMap(class_weight=None)(lab)[0]
    binary = BorderWeightMap(class_weight=None, object_labels=[1, 2])(lab)[0]
    # instance mode: id 2 (both pieces) is nearest at 3 (col 29), id 1 second at 13 (col 19)
    assert inst[15, 32] == pytest.approx(1.0 + border(3, 13), rel=1e-6)
    # binary mode: the touching squares are one component (3 away), the detached piece another (4 away)
    assert binary[15, 32] == pytest.approx(1.0 + border(3, 4), rel=1e-6)
    np.testing.assert_allclose(inst, naive(lab, class_weight=None), atol=1e-5)
    np.testing.assert_allclose(binary, naive(lab, object_labels=[1, 2], class_weight=None), atol=1e-5)
    # one component only (detached piece removed): no border term in binary mode, still one in instance mode
    lab[0, 10:20, 36:40] = 0
    assert BorderWeightMap(class_weight=None, object_labels=[1, 2])(lab)[0].max() == 1.0
    assert BorderWeightMap(class_weight=None)(lab)[0, 9, 20] == pytest.approx(1.0 + border(1, math.sqrt(2)), rel=1e-6)


def test_membrane_between_two_cells():
    """Demo usage: label 1 = membrane, cells = components of label 0, uint8 (1, H, W)."""
    lab = np.zeros((1, 20, 21), np.uint8)
    lab[0, :, 10] = 1
    w = BorderWeightMap(object_labels=[0], class_weight=None)(lab)
    np.testing.assert_allclose(w[0, :, 10], 1.0 + border(1, 1), rtol=1e-6)
    assert np.all(w[0, :, :10] == 1.0)
    # a diagonal 1-voxel membrane still separates two cells (face connectivity for the components)
    diag = np.eye(20, dtype=np.uint8)[None]
    w = BorderWeightMap(object_labels=[0], class_weight=None)(diag)
    np.testing.assert_allclose(w[0][diag[0] == 1], 1.0 + border(1, 1), rtol=1e-6)


def test_class_weight_sequence_and_empty_label():
    lab = two_squares_2d()
    w = BorderWeightMap(w0=0.0, class_weight=[0.5, 3.0])(lab)[0]
    assert set(np.unique(w)) == {0.5, 3.0}
    empty = BorderWeightMap()(np.zeros((1, 8, 8), np.uint8))  # no objects: w_c = 1 everywhere
    np.testing.assert_array_equal(empty, np.ones((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="class_weight"):
        BorderWeightMap(class_weight=[1.0])(lab)


def test_containers_and_dict():
    lab = two_squares_2d()
    ref = BorderWeightMap()(lab)
    affine = torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64))
    mt = MetaTensor(torch.from_numpy(lab).float(), affine=affine, meta={"filename_or_obj": "x.nii.gz"})
    out = BorderWeightMap()(mt)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "x.nii.gz"
    np.testing.assert_array_equal(out.numpy(), ref)
    t = BorderWeightMap()(torch.from_numpy(lab))
    assert type(t) is torch.Tensor and t.dtype == torch.float32

    d = BorderWeightMapd(keys="label", weight_key="w")({"label": mt, "image": 1})
    assert d["label"] is mt and d["image"] == 1 and isinstance(d["w"], MetaTensor)
    np.testing.assert_array_equal(d["w"].numpy(), ref)
    assert BorderWeightMapd(keys=["label", "other"], weight_key=["w", "w2"], allow_missing_keys=True)(
        {"label": lab}
    ).keys() == {"label", "w"}
    with pytest.raises(KeyError):
        BorderWeightMapd(keys="other")({"label": lab})
    with pytest.raises(ValueError, match="weight_key"):
        BorderWeightMapd(keys=["a", "b"])  # both would write "weight_map"


@pytest.mark.parametrize(
    "kwargs, img, name",
    [
        ({}, np.zeros((8, 8)), "img"),  # no channel dim
        ({}, np.zeros((2, 8, 8)), "img"),  # two channels
        ({}, np.full((1, 8, 8), 0.5), "img"),  # non-integer floats
        ({}, np.full((1, 8, 8), -1), "img"),
        ({"sigma": -1.0}, None, "sigma"),
        ({"sigma": 0.0}, None, "sigma"),
        ({"w0": -1.0}, None, "w0"),
        ({"spacing": (1.0, 0.0)}, None, "spacing"),
        ({"spacing": (1.0, 1.0, 1.0)}, np.zeros((1, 8, 8)), "spacing"),
        ({"class_weight": "inverse"}, None, "class_weight"),
        ({"object_labels": []}, None, "object_labels"),
    ],
)
def test_bad_input(kwargs, img, name):
    with pytest.raises(ValueError, match=name):
        BorderWeightMap(**kwargs)(img)


def test_isbi_cells_speed_and_range(shared_data):
    from PIL import Image

    path = shared_data("isbi2012_em") / "labels" / "00.png"
    lab = (np.asarray(Image.open(path).convert("L")) == 0).astype(np.uint8)[None]  # 1 = membrane
    w = BorderWeightMap(object_labels=[0])(lab)
    assert w.shape == (1, 512, 512) and np.isfinite(w).all()
    assert w[lab == 1].mean() > w[lab == 0].mean()
