"""segloss: class-imbalance and topology-aware segmentation losses for MONAI."""

import importlib.metadata

from segloss.losses import *  # noqa: F401,F403  (the losses are re-exported at top level)
from segloss.losses import __all__ as _losses_all

try:
    __version__ = importlib.metadata.version("segloss")  # defined once, in pyproject.toml
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
__all__ = list(_losses_all)
