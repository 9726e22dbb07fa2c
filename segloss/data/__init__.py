"""Data for segloss examples, tests and bundles: synthetic thin-structure sets, download helpers, datalists."""

from segloss.data.datasets import isbi2012_datalist, nifti_datalist, parse_sections, resolve_dataset, split_datalist
from segloss.data.download import DataUnavailableError, download_file, download_isbi2012, download_msd_spleen
from segloss.data.io import ImageReadError, LoadImaged
from segloss.data.synthetic import membrane_2d, vessels_3d, write_ct_3d, write_membrane_2d

__all__ = ["isbi2012_datalist", "nifti_datalist", "parse_sections", "resolve_dataset", "split_datalist"]
__all__ += ["DataUnavailableError", "download_file", "download_isbi2012", "download_msd_spleen"]
__all__ += ["ImageReadError", "LoadImaged"]
__all__ += ["membrane_2d", "vessels_3d", "write_ct_3d", "write_membrane_2d"]
