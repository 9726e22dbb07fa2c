"""segloss: class-imbalance and topology-aware segmentation losses for MONAI."""

from segloss.losses import *  # noqa: F401,F403  (the losses are re-exported at top level)
from segloss.losses import __all__ as _losses_all

__version__ = "0.1.0"
__all__ = list(_losses_all)
