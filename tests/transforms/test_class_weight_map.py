"""ClassWeightMap(d) against a float64 inverse-frequency formula written here."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from segloss.transforms import ClassWeightMap, ClassWeightMapd


def reference(lab, ignore_index=None, ratio=None, bounds=None):
    """w_c = N / (K n_c) over non-ignored voxels; ratio cap + renormalise; then absolute clip."""
    lab = lab[0]
    valid = lab != ignore_index if ignore_index is not None else np.ones(lab.shape, bool)
    classes = [c for c in np.unique(lab[valid])]
    n, k = valid.sum(), len(classes)
    w = {c: n / (k * np.sum(lab[valid] == c)) for c in classes}
    if ratio is not None:
        low = min(w.values())
        w = {c: min(v, ratio * low) for c, v in w.items()}
        mean = sum(w[c] * np.sum(lab[valid] == c) for c in classes) / n
        w = {c: v / mean for c, v in w.items()}
    if bounds is not None:
        w = {c: min(max(v, bounds[0]), bounds[1]) for c, v in w.items()}
    out = np.zeros(lab.shape)
    for c in classes:
        out[(lab == c) & valid] = w[c]
    return out[None]


def random_label(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([0, 1, 2, 5], size=(1, *shape), p=[0.85, 0.1, 0.04, 0.01])


@pytest.mark.parametrize("shape", [(40, 50), (12, 16, 20)])
def test_matches_formula_and_mean_one(shape):
    lab = random_label(shape)
    w = ClassWeightMap()(lab)
    assert w.shape == lab.shape and w.dtype == np.float32
    np.testing.assert_allclose(w, reference(lab), rtol=1e-6)
    assert w.astype(np.float64).mean() == pytest.approx(1.0, rel=1e-6)


def test_ignore_index():
    lab = random_label((40, 50), seed=1)
    lab[0, :5] = 255
    w = ClassWeightMap(ignore_index=255)(lab)
    np.testing.assert_allclose(w, reference(lab, ignore_index=255), rtol=1e-6)
    assert np.all(w[0, :5] == 0) and w[lab != 255].astype(np.float64).mean() == pytest.approx(1.0, rel=1e-6)


def test_clip_ratio_and_bounds():
    lab = random_label((60, 60), seed=2)
    w = ClassWeightMap(clip=5.0)(lab)
    np.testing.assert_allclose(w, reference(lab, ratio=5.0), rtol=1e-6)
    assert w.max() / w.min() == pytest.approx(5.0, rel=1e-6)
    assert w.astype(np.float64).mean() == pytest.approx(1.0, rel=1e-6)
    w = ClassWeightMap(clip=(0.5, 4.0))(lab)
    np.testing.assert_allclose(w, reference(lab, bounds=(0.5, 4.0)), rtol=1e-6)
    assert w.min() == 0.5 and w.max() == 4.0


def test_edge_cases():
    ones = ClassWeightMap()(np.full((1, 4, 4), 3, np.uint8))  # one class: all ones
    np.testing.assert_array_equal(ones, np.ones((1, 4, 4), np.float32))
    empty = ClassWeightMap(ignore_index=0)(np.zeros((1, 4, 4), np.uint8))  # all ignored: all zeros
    np.testing.assert_array_equal(empty, np.zeros((1, 4, 4), np.float32))
    lab = random_label((10, 10)).astype(np.float32)  # integer-valued floats are fine
    np.testing.assert_allclose(ClassWeightMap(num_classes=6)(lab), reference(lab), rtol=1e-6)


def test_containers_and_dict():
    lab = random_label((20, 24))
    ref = ClassWeightMap()(lab)
    mt = MetaTensor(torch.from_numpy(lab).float(), affine=torch.eye(3) * 2, meta={"filename_or_obj": "a.nii"})
    out = ClassWeightMap()(mt)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.meta["filename_or_obj"] == "a.nii"
    assert torch.equal(out.affine, mt.affine)
    np.testing.assert_array_equal(out.numpy(), ref)
    d = ClassWeightMapd(keys=["l1", "l2"], weight_key=["w1", "w2"], allow_missing_keys=True)({"l2": lab})
    assert set(d) == {"l2", "w2"}
    np.testing.assert_array_equal(d["w2"], ref)
    with pytest.raises(KeyError):
        ClassWeightMapd(keys="l1")({"l2": lab})
    with pytest.raises(ValueError, match="weight_key"):
        ClassWeightMapd(keys=["a", "b"], weight_key=["w"])


@pytest.mark.parametrize(
    "kwargs, img, name",
    [
        ({}, np.zeros((4, 4)), "img"),
        ({}, np.zeros((1, 1, 1, 4, 4)), "img"),
        ({}, np.array([[[0.0, 1.5]]]), "img"),
        ({}, np.array([[[0.0, np.nan]]]), "img"),
        ({}, np.array([[[0, -3]]]), "img"),
        ({"num_classes": 2}, np.array([[[0, 2]]]), "num_classes"),
        ({"num_classes": 0}, None, "num_classes"),
        ({"clip": 0.5}, None, "clip"),
        ({"clip": (3.0, 1.0)}, None, "clip"),
    ],
)
def test_bad_input(kwargs, img, name):
    with pytest.raises(ValueError, match=name):
        ClassWeightMap(**kwargs)(img)
