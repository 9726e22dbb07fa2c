"""segloss.data.LoadImaged: MONAI's loader, with errors that name the file."""

import numpy as np
import pytest
from monai.transforms import LoadImaged as MonaiLoadImaged

from segloss.data import ImageReadError, LoadImaged, write_ct_3d


def test_same_result_as_monai(tmp_path):
    write_ct_3d(tmp_path, num=1, size=16)
    item = {
        "image": str(tmp_path / "imagesTr" / "case_000.nii.gz"),
        "label": str(tmp_path / "labelsTr" / "case_000.nii.gz"),
    }
    ours = LoadImaged(keys=["image", "label"], image_only=True)(item)
    ref = MonaiLoadImaged(keys=["image", "label"], image_only=True)(item)
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(ref[key]))
        np.testing.assert_array_equal(ours[key].affine, ref[key].affine)


def test_truncated_gzip_names_the_file(tmp_path):
    write_ct_3d(tmp_path, num=1, size=16)
    path = tmp_path / "imagesTr" / "case_000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as monai_err:
        MonaiLoadImaged(keys="image", image_only=True)({"image": str(path)})
    assert str(path) not in str(monai_err.value), "MONAI's own error does not say which file (why this exists)"
    with pytest.raises(ImageReadError, match=r"image=.*case_000\.nii\.gz.*EOFError"):
        LoadImaged(keys="image", image_only=True)({"image": str(path)})
