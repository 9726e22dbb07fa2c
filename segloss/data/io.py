"""Image loading that names the file when reading fails."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import LoadImaged as _MonaiLoadImaged

__all__ = ["ImageReadError", "LoadImaged"]


class ImageReadError(RuntimeError):
    """An image file could not be read; the message names the file(s)."""


class LoadImaged(_MonaiLoadImaged):
    """MONAI's :class:`~monai.transforms.LoadImaged` (same arguments) whose errors name the files.

    A truncated ``.nii.gz`` makes nibabel raise ``EOFError: Compressed file ended ...`` without a file name, and
    MONAI wraps it as ``applying transform <LoadImaged object>``; on a data set of hundreds of volumes that
    does not say which file to replace. Here any failure is re-raised as :class:`ImageReadError` listing the
    files of the item (``key=path``) and the original error, chained as its cause.
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        try:
            return super().__call__(data, reader)
        except Exception as e:
            files = ", ".join(f"{k}={data[k]}" for k in self.keys if k in data)
            raise ImageReadError(f"cannot read {files}: {type(e).__name__}: {e}") from e
