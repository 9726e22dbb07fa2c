"""Networks used inside segloss losses (frozen feature extractors)."""

from segloss.networks.mask_features import MaskFeatures, mask_features_weights_path
from segloss.networks.vgg import VGG19_LAYERS, VGG19Features, WeightsNotFoundError, load_vgg19_state_dict

__all__ = [
    "VGG19_LAYERS",
    "MaskFeatures",
    "VGG19Features",
    "WeightsNotFoundError",
    "load_vgg19_state_dict",
    "mask_features_weights_path",
]
