"""A small frozen CNN on probability maps of thin structures, trained on label masks only: a topology prior for
:class:`segloss.losses.TopologyLoss` that needs no ImageNet weights.

The term of Mosinska et al. compares VGG-19 ImageNet features of the prediction and the label. Offline, random
VGG-19 features rank a cut across a membrane *below* border noise of the same pixel count, and their gradient on a
soft prediction is spread over every boundary pixel. :class:`MaskFeatures` is trained (by
``benchmarks/train_mask_features.py``, on ISBI 2012 label sections 00-23 and segloss's synthetic membranes) so
that its feature distance is large for cuts, false bridges and spurious fragments, small for border thinning,
thickening and blur, and so that the gradient of the term on a soft prediction points into the gaps and out of
the bridges. How it was made and what it measures: ``docs/mask_features.md``.

Architecture (2D): seven 3x3 convolutions with ReLUs between them, channels 8-16-16-32-32-32-32, strides 1-2-1-2-1-2-1;
the outputs of convolutions 3, 5 and 7 (before their ReLU; 1/2, 1/4 and 1/8 resolution, receptive fields 13, 29
and 61 px) are the feature maps. About 2 kMAC per pixel, 37k parameters. The native 3D variant has six 3x3x3
convolutions, channels 8-8-16-16-16-16, strides 2-1-2-1-2-1 (maps: convolutions 2, 4 and 6, at the same 1/2, 1/4
and 1/8 resolution; about 0.4 kMAC per voxel, 26k parameters). Its first convolution is strided so that no
feature map has the volume's full resolution: at 2 x 96^3 that made the term 6.6x cheaper on the CPU than a
full-resolution first layer with half the channels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MASK_FEATURES_LAYERS", "MaskFeatures", "mask_features_weights_path"]

# (in_channels, out_channels, stride, is a feature map) of each 3x3 (3x3x3) conv. The 3D variant has half the
# channels and no full-resolution layer: a 3x3x3 conv costs 3x a 3x3 one per voxel, and volumes have many more
# voxels.
MASK_FEATURES_LAYERS = {
    2: ((1, 8, 1, False), (8, 16, 2, False), (16, 16, 1, True), (16, 32, 2, False), (32, 32, 1, True),
        (32, 32, 2, False), (32, 32, 1, True)),
    3: ((1, 8, 2, False), (8, 8, 1, True), (8, 16, 2, False), (16, 16, 1, True), (16, 16, 2, False),
        (16, 16, 1, True)),
}  # fmt: skip
_WEIGHTS_DIR = Path(__file__).resolve().parent


def mask_features_weights_path(spatial_dims: int = 2) -> Path:
    """The weight file shipped with segloss for ``spatial_dims`` (2 or 3)."""
    return _WEIGHTS_DIR / f"mask_features_{spatial_dims}d.pt"


class MaskFeatures(nn.Module):
    """Frozen mask-domain features: ``(N, 1, H, W)`` probability map in [0, 1] -> list of 3 feature maps.

    Args:
        spatial_dims: 2 (``Conv2d``, input ``(N, 1, H, W)``) or 3 (``Conv3d``, input ``(N, 1, D, H, W)``: a native
            3D variant scoring volumes directly, with its own weights).
        weights: ``"shipped"`` (the file segloss ships, see :func:`mask_features_weights_path`), a path, a state
            dict, or None for a seeded random initialisation (what the training script starts from).
        seed: seed of the random initialisation (``weights=None``); the global RNG is not touched.

    The module is frozen (``requires_grad=False``, eval mode kept by :meth:`train`); gradients flow to the input.
    The output maps are multiplied by the ``scale`` buffer (one factor per map, stored with the weights), set by
    the training script so that the term of a typical corrupted prediction is of order 1.

    Example::

        >>> feats = MaskFeatures()(torch.zeros(2, 1, 64, 64))
        >>> [tuple(f.shape) for f in feats]
        [(2, 16, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8)]
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = "shipped",
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"`spatial_dims` must be 2 or 3, got {spatial_dims!r}.")
        self.spatial_dims = spatial_dims
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        # skip_init: building the network does not consume the global RNG
        self.convs = nn.ModuleList(
            nn.utils.skip_init(conv, cin, cout, kernel_size=3, stride=stride, padding=1)
            for cin, cout, stride, _ in MASK_FEATURES_LAYERS[spatial_dims]
        )
        num_maps = sum(is_map for *_, is_map in MASK_FEATURES_LAYERS[spatial_dims])
        self.register_buffer("scale", torch.ones(num_maps))
        if weights is None:
            self._random_init(seed)
        else:
            if isinstance(weights, str) and weights == "shipped":
                weights = mask_features_weights_path(self.spatial_dims)
            if not isinstance(weights, Mapping):
                if not isinstance(weights, (str, os.PathLike)):
                    raise TypeError(
                        f"`weights` must be 'shipped', a path, a state dict or None, got {type(weights).__name__}."
                    )
                weights = torch.load(weights, map_location="cpu", weights_only=True)
            self.load_state_dict(weights)
        self.requires_grad_(False)
        super().train(False)

    @torch.no_grad()
    def _random_init(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for m in self.convs:
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            m.bias.zero_()

    @property
    def num_maps(self) -> int:
        return int(self.scale.numel())

    def train(self, mode: bool = True) -> MaskFeatures:
        """Stays in eval mode: the extractor is a fixed measuring device (it has no BatchNorm/Dropout anyway)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != 1:
            dims = "(N, 1, H, W)" if self.spatial_dims == 2 else "(N, 1, D, H, W)"
            raise ValueError(f"`x` must have shape {dims}, got {tuple(x.shape)}.")
        x = x.to(self.scale.dtype)  # a float64 or half input meets float32 weights (autocast still casts the convs)
        out = []
        for i, (m, (*_, is_map)) in enumerate(zip(self.convs, MASK_FEATURES_LAYERS[self.spatial_dims])):
            if i:
                x = F.relu(x)
            x = m(x)
            if is_map:
                out.append(x * self.scale[len(out)])
        return out
