"""segloss.data.synthetic: determinism, shapes, label values, thin and connected structures, writers."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from segloss.data.synthetic import membrane_2d, vessels_3d, write_ct_3d, write_membrane_2d


@pytest.fixture(scope="module")
def membranes():
    return membrane_2d(4, size=(128, 160), seed=3)


@pytest.fixture(scope="module")
def volumes():
    return vessels_3d(2, size=(64, 56, 48), seed=1)


def test_membrane_shapes_dtypes_values(membranes):
    images, labels = membranes
    assert images.shape == labels.shape == (4, 1, 128, 160)
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.unique(labels)) == {0, 1}


def test_membrane_deterministic_and_prefix_stable(membranes):
    images, labels = membranes
    again = membrane_2d(2, size=(128, 160), seed=3)
    np.testing.assert_array_equal(again[0], images[:2])
    np.testing.assert_array_equal(again[1], labels[:2])
    other = membrane_2d(1, size=(128, 160), seed=4)
    assert not np.array_equal(other[1][0], labels[0])


def test_membranes_are_thin_connected_and_dark(membranes):
    images, labels = membranes
    for img, lab in zip(images[:, 0], labels[:, 0].astype(bool)):
        components, n = ndimage.label(lab, np.ones((3, 3)))
        sizes = np.bincount(components.ravel())[1:]
        assert sizes.max() >= 0.95 * lab.sum(), "the membrane network is (almost) one connected piece"
        # mean thickness = area / skeleton length, 2-4 px
        thickness = lab.sum() / skeletonize(lab).sum()
        assert 1.8 <= thickness <= 4.0
        _, cells = ndimage.label(~lab)
        assert cells >= 8, "membranes separate many cells"
        assert img[lab].mean() < img[~lab].mean() - 0.15, "membranes are darker than cells, like EM"


def test_vessels_shapes_values_and_connectivity(volumes):
    images, labels = volumes
    assert images.shape == labels.shape == (2, 1, 64, 56, 48)
    assert images.dtype == np.int16 and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}
    for img, lab in zip(images[:, 0], labels[:, 0]):
        vessel = lab == 1
        _, n = ndimage.label(vessel, np.ones((3, 3, 3)))
        assert n == 1, "the vessel tree is one connected component"
        assert vessel.mean() < 0.02, "vessels are thin"
        # HU-like intensities: air outside the body, contrast-filled vessels brighter than the organ
        assert img[0, 0, 0] < -800
        assert img[vessel].mean() > img[lab == 2].mean() > img[lab == 0].mean()


def test_vessels_deterministic_and_no_organ(volumes):
    images, labels = volumes
    again = vessels_3d(1, size=(64, 56, 48), seed=1)
    np.testing.assert_array_equal(again[0], images[:1])
    _, no_organ = vessels_3d(1, size=(64, 56, 48), seed=1, organ=False)
    assert set(np.unique(no_organ)) == {0, 1}


@pytest.mark.parametrize("bad", [8, (64, 64), (0, 64, 64)])
def test_bad_size_names_argument(bad):
    with pytest.raises(ValueError, match="size"):
        vessels_3d(1, size=bad)


def test_negative_num_names_argument():
    with pytest.raises(ValueError, match="num"):
        membrane_2d(-1)


def test_write_membrane_2d_isbi_layout_and_polarity(tmp_path):
    write_membrane_2d(tmp_path, num=3, size=64, seed=2)
    images, labels = membrane_2d(3, size=64, seed=2)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00.png", "01.png", "02.png"]
    img = np.asarray(Image.open(tmp_path / "images" / "01.png"))
    lab = np.asarray(Image.open(tmp_path / "labels" / "01.png"))
    assert img.dtype == np.uint8 and set(np.unique(lab)) == {0, 255}
    np.testing.assert_array_equal(lab == 0, labels[1, 0] == 1)  # ISBI polarity: 0 = membrane
    np.testing.assert_allclose(img / 255.0, images[1, 0], atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("structure,values", [("organ", {0, 1}), ("vessel", {0, 1}), ("all", {0, 1, 2})])
def test_write_ct_3d_msd_layout(tmp_path, structure, values):
    write_ct_3d(tmp_path, num=2, size=32, seed=5, spacing=(1.0, 2.0, 3.0), structure=structure)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and len(meta["training"]) == 2
    image = nib.load(tmp_path / meta["training"][1]["image"])
    label = nib.load(tmp_path / meta["training"][1]["label"])
    np.testing.assert_allclose(image.header.get_zooms(), (1.0, 2.0, 3.0))
    assert image.get_data_dtype() == np.int16 and label.shape == (32, 32, 32)
    assert set(np.unique(np.asarray(label.dataobj))) == values
    _, expected = vessels_3d(2, size=32, seed=5, organ=structure != "vessel")
    truth = expected[1, 0] == 2 if structure == "organ" else expected[1, 0]
    np.testing.assert_array_equal(np.asarray(label.dataobj), truth)


def test_write_ct_3d_bad_structure(tmp_path):
    with pytest.raises(ValueError, match="structure"):
        write_ct_3d(tmp_path, num=1, size=32, structure="liver")
