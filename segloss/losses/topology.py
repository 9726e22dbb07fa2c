"""Topology loss of Mosinska et al., "Beyond the Pixel-Wise Loss for Topology-Aware Delineation", CVPR 2018.

Thin structures (roads, neurites, membranes, vessels) are scored pixel by pixel by BCE or Dice, which barely
notices a one-pixel gap that breaks a line, or a spurious bridge between two. Mosinska et al. add a perceptual
term: the squared distance between the responses of a fixed ImageNet VGG-19 to the predicted probability map and
to the ground truth,

    L_top(p, g) = sum_n w_n * 1/(C_n H_n W_n) * || f_n(p) - f_n(g) ||^2,

with f_n the activations of layer n (default conv1_2, conv2_2, conv3_4, before ReLU, as in the paper); its
filters respond to lines, junctions and gaps at several scales. The full objective is
``L = L_pixel + mu * L_top`` (:class:`TopologyAwareLoss`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from segloss.losses.compound import CompoundLoss
from segloss.losses.inputs import (
    activate,
    check_reduction,
    finite_loss,
    prepare_target,
    reduce_loss,
    validate_act_args,
)
from segloss.networks.mask_features import MaskFeatures
from segloss.networks.vgg import VGG19Features, WeightsNotFoundError, load_vgg19_state_dict

__all__ = ["TopologyAwareLoss", "TopologyLoss", "feature_distance", "min_image_size", "topology_loss"]

DEFAULT_LAYERS = ("conv1_2", "conv2_2", "conv3_4")

logger = logging.getLogger(__name__)


def _default_extractor(weights, layers: Sequence[str] | None) -> nn.Module:
    """VGG-19 for ``weights`` (``"auto"``: ImageNet VGG-19 if on this machine, nothing downloaded, else the 2D
    :class:`~segloss.networks.MaskFeatures` shipped with segloss)."""
    if not (isinstance(weights, str) and weights == "auto"):
        return VGG19Features(DEFAULT_LAYERS if layers is None else layers, weights=weights)
    try:
        state = load_vgg19_state_dict("imagenet", download=False)
    except WeightsNotFoundError:
        ignored = f"; `layers` {list(layers)} apply to VGG-19 only and are ignored" if layers is not None else ""
        logger.info(
            "topology term: weights='auto' uses segloss MaskFeatures (mask-domain prior shipped with segloss; "
            f"no ImageNet VGG-19 on this machine){ignored}."
        )
        return MaskFeatures(2)
    logger.info("topology term: weights='auto' uses the ImageNet VGG-19 found on this machine.")
    return VGG19Features(DEFAULT_LAYERS if layers is None else layers, weights=state)


def _feature_list(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return list(out.values())
    if isinstance(out, (list, tuple)):
        return list(out)
    raise TypeError(f"`feature_extractor` must return a tensor, a list or a dict of tensors, got {type(out).__name__}.")


def feature_distance(
    feature_extractor: Callable[[torch.Tensor], object],
    pred: torch.Tensor,
    target: torch.Tensor,
    layer_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Per-image ``sum_n w_n * mean((f_n(pred) - f_n(target))^2)``.

    Args:
        feature_extractor: maps ``(N, 1, H, W)`` to a list/dict of feature maps ``(N, *)``.
        pred, target: ``(N, 1, H, W)`` images; the target's features are computed without a graph.
        layer_weights: one weight per returned feature map (in its order), default all 1.

    Returns:
        ``(N,)`` float32; squared differences are taken in float32 (the features may be fp16/bf16 under autocast).
    """
    with torch.no_grad():
        target_features = _feature_list(feature_extractor(target))
    pred_features = _feature_list(feature_extractor(pred))
    if layer_weights is None:
        layer_weights = [1.0] * len(pred_features)
    if len(layer_weights) != len(pred_features) or len(target_features) != len(pred_features):
        raise ValueError(
            f"`layer_weights` has {len(layer_weights)} entries but the feature extractor returned "
            f"{len(pred_features)} feature maps."
        )
    total = None
    with torch.autocast(pred.device.type, enabled=False):
        for w, fp, ft in zip(layer_weights, pred_features, target_features):
            term = w * (fp.float() - ft.float()).square().flatten(1).mean(1)
            total = term if total is None else total + term
    return total


def _slice_indices(size: int, num_slices: int | None, generator: torch.Generator | None, device) -> torch.Tensor | None:
    """Indices of the slices to use along one axis, or None for all of them."""
    if num_slices is None or num_slices >= size:
        return None
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randperm(size, generator=generator, device=gen_device)[:num_slices].to(device)


def min_image_size(feature_extractor: nn.Module) -> int:
    """The smallest height and width ``feature_extractor`` takes: ``2 ** k`` for its ``k`` 2x2 max-pools (each
    halves the image, and a side of 1 has nothing left to pool)."""
    return 2 ** sum(isinstance(m, nn.MaxPool2d) for m in feature_extractor.modules())


@finite_loss
def topology_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    feature_extractor: Callable[[torch.Tensor], object],
    layer_weights: Sequence[float] | None = None,
    num_slices: int | None = None,
    generator: torch.Generator | None = None,
    min_size: int = 1,
) -> torch.Tensor:
    """Topology loss per (sample, channel), each channel fed to the extractor as a 1-channel image.

    2D: ``pred``, ``target`` ``(B, C, H, W)`` -> :func:`feature_distance` of each ``(b, c)`` image.

    3D: ``(B, C, D, H, W)``; an extractor with ``spatial_dims == 3`` (the 3D
    :class:`~segloss.networks.MaskFeatures`) takes each ``(b, c)`` volume whole. Otherwise the 2D loss of slices
    along each of the three axes (``num_slices`` slices per axis drawn without replacement with ``generator``,
    the same slices for every sample, channel, prediction and target; None = all slices), averaged over the
    slices of an axis and then over the axes, so a 3D value is on the 2D scale.

    ``min_size`` is the smallest side of an image the extractor takes (:func:`min_image_size`). A 2D image with a
    smaller side raises ``ValueError``; in 3D the axes whose slices have a smaller side (e.g. the slices across a
    thin axis) are skipped, and only a volume with no axis left raises.

    Returns:
        ``(B, C)`` float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"`pred` {tuple(pred.shape)} and `target` {tuple(target.shape)} must have the same shape.")
    B, C = pred.shape[:2]
    if pred.ndim not in (4, 5):
        raise ValueError(f"`pred` must be 2D (B,C,H,W) or 3D (B,C,D,H,W), got shape {tuple(pred.shape)}.")
    if pred.ndim == 4 or getattr(feature_extractor, "spatial_dims", 2) == 3:  # images, or volumes taken whole
        if min(pred.shape[2:]) < min_size:
            raise ValueError(
                f"`input` of spatial size {tuple(pred.shape[2:])} is smaller than the "
                f"{' x '.join([str(min_size)] * (pred.ndim - 2))} the feature extractor needs (2 per max-pool before "
                "its deepest layer)."
            )
        images = (x.reshape(B * C, 1, *pred.shape[2:]) for x in (pred, target))
        return feature_distance(feature_extractor, *images, layer_weights).reshape(B, C)
    axes = [a for a in (2, 3, 4) if min(s for d, s in enumerate(pred.shape) if d >= 2 and d != a) >= min_size]
    if not axes:
        raise ValueError(
            f"`input` volume of size {tuple(pred.shape[2:])} has no axis whose slices reach the {min_size} x "
            f"{min_size} pixels the feature extractor needs (2 per max-pool before its deepest layer)."
        )
    per_axis = []
    for axis in axes:
        idx = _slice_indices(pred.shape[axis], num_slices, generator, pred.device)
        images = []
        for x in (pred, target):
            if idx is not None:
                x = x.index_select(axis, idx)
            x = x.movedim(axis, 2)  # (B, C, k, h, w): the slices of this axis
            images.append(x.reshape(-1, 1, *x.shape[3:]))
        per_axis.append(feature_distance(feature_extractor, *images, layer_weights).reshape(B, C, -1).mean(-1))
    return torch.stack(per_axis).mean(0)


class TopologyLoss(nn.Module):
    r"""Topology (perceptual VGG-19) loss of Mosinska et al., CVPR 2018, taking logits like every segloss loss.

    The prediction is activated (``sigmoid`` / ``softmax`` / ``other_act``); each used channel's probability map
    and the matching target map (one-hot of a label map, or the dense target's channel) go through a frozen
    feature extractor as 1-channel images, and the loss of a (sample, channel) is
    ``sum_n w_n * mean((f_n(p) - f_n(g))^2)`` over the layers n:

    .. math::

        L_{bc} = \sum_n w_n \, \frac{1}{|f_n|} \left\| f_n(u \odot p_{bc}) - f_n(u \odot g_{bc}) \right\|_2^2

    with ``w_n`` = ``layer_weights`` (1 by default), ``|f_n|`` the size of the feature map ``f_n`` and ``u``
    the voxel weight (0 at ``ignore_index``, else 1), then reduced over the ``(B, n)`` values. 3D inputs use 2D
    slices along each axis, averaged (:func:`topology_loss`); ``num_slices`` bounds the cost (96^3 with all slices
    costs as much as 288 images of 96^2 per channel).

    Cost: VGG-19 up to conv3_4 is about 29 GFLOP per forward pass of a 256^2 image (446 kFLOP per pixel); a step
    runs it on the target, the prediction and back through the prediction (input gradient only), about 3x that.
    That is far more than a small UNet's step (see ``benchmarks/topology.py``); shallower ``layers`` are cheaper.

    Binary segmentation: one channel with ``sigmoid=True``, or two with ``softmax=True`` (the background channel
    is left out by default: its map is 1 - foreground and carries the same lines).

    Args:
        include_background: use channel 0 when there are several channels (one channel is always used).
        to_onehot_y, sigmoid, softmax, other_act: as MONAI (see :mod:`segloss.losses.inputs`).
        ignore_index: label (label-map target) or value (dense target) to ignore: the prediction and the target
            are both set to 0 at ignored voxels before the network, so the ignored region looks alike in both
            and gradients there are 0. (Its border can still cost a little through the receptive field.)
        layers: VGG-19 layers (see :class:`segloss.networks.VGG19Features`), default conv1_2, conv2_2, conv3_4.
        layer_weights: one weight per feature map, in the extractor's output order (default all 1).
        weights: ``"auto"`` (default): the ImageNet VGG-19 if it is on this machine (``$SEGLOSS_VGG19_WEIGHTS`` or
            torch hub's cache; nothing is downloaded), else :class:`segloss.networks.MaskFeatures`, the mask-domain
            topology prior shipped with segloss (one log line says which). Or VGG-19 weights: ``"imagenet"``
            (searched for at construction, downloaded when online; raises
            :class:`segloss.networks.WeightsNotFoundError` listing the options when absent), a path, a state
            dict, or None (seeded random VGG-19, for tests). With MaskFeatures, 3D inputs go whole through its
            native 3D variant (``volume_extractor``), not slice by slice.
        feature_extractor: any frozen ``nn.Module`` mapping ``(N, 1, H, W)`` to a list/dict of features, used
            instead of VGG-19 (``layers`` and ``weights`` then do not apply). It is put in eval mode with
            ``requires_grad=False`` and kept in eval mode by :meth:`train`.
        num_slices: 3D only: slices sampled per axis and call (None = all). Default 8.
            Slices smaller than the extractor takes (4 x 4 pixels for the default layers, see
            :func:`min_image_size`) are skipped with their axis, e.g. those across a thin axis; a 2D image that
            small raises ``ValueError``.
        generator: a ``torch.Generator`` or an int seed for the slice sampling (None = the global RNG).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the ``(B, n)`` values of the ``n`` channels used
            (``"none"``: ``(B, n, 1, ...)``).

    Example:
        Identity features give the MSE of the probabilities; a random VGG-19 (``weights=None``) is 0 at the target:

        >>> from segloss.losses import TopologyLoss
        >>> _ = torch.manual_seed(0)
        >>> logits, mask = torch.randn(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
        >>> mse = TopologyLoss(sigmoid=True, feature_extractor=torch.nn.Identity())
        >>> torch.allclose(mse(logits, mask), (logits.sigmoid() - mask).square().mean())
        True
        >>> vgg = TopologyLoss(weights=None, layers=["conv1_2"], reduction="none")  # background channel left out
        >>> vgg(torch.cat([1 - mask, mask], 1), mask.long()).flatten().tolist()  # probabilities = target
        [0.0, 0.0]

    Bundle config::

        "loss": {"_target_": "segloss.losses.TopologyAwareLoss",
                 "pixel_loss": {"_target_": "monai.losses.DiceCELoss", "sigmoid": true},
                 "mu": 0.1, "topology_loss": {"sigmoid": true}}
    """

    def __init__(
        self,
        include_background: bool = False,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        ignore_index: int | None = None,
        layers: Sequence[str] | None = None,
        layer_weights: Sequence[float] | None = None,
        weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = "auto",
        feature_extractor: nn.Module | None = None,
        num_slices: int | None = 8,
        generator: torch.Generator | int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        validate_act_args(sigmoid, softmax, other_act)
        self.reduction = check_reduction(reduction)
        if num_slices is not None and (
            isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1
        ):
            raise ValueError(f"`num_slices` must be None or a positive int, got {num_slices!r}.")
        built_prior = False  # the 2D MaskFeatures chosen by weights="auto" comes with its native 3D twin
        if feature_extractor is None:
            feature_extractor = _default_extractor(weights, layers)
            built_prior = isinstance(feature_extractor, MaskFeatures)
            num_maps = (
                len(feature_extractor.layers)
                if isinstance(feature_extractor, VGG19Features)
                else feature_extractor.num_maps
            )
        elif layers is not None:
            raise ValueError("`layers` selects VGG-19 layers; with a custom `feature_extractor` leave it None.")
        else:
            if not isinstance(feature_extractor, nn.Module):
                raise TypeError(f"`feature_extractor` must be an nn.Module, got {type(feature_extractor).__name__}.")
            feature_extractor.requires_grad_(False).eval()
            num_maps = None
        if layer_weights is not None:
            layer_weights = [float(w) for w in layer_weights]
            if any(not (w >= 0 and w != float("inf")) for w in layer_weights):
                raise ValueError(f"`layer_weights` must be finite and >= 0, got {layer_weights}.")
            if num_maps is not None and len(layer_weights) != num_maps:
                raise ValueError(f"`layer_weights` has {len(layer_weights)} entries for {num_maps} layers.")
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator, an int seed or None, got {type(generator).__name__}."
            )
        self.feature_extractor = feature_extractor
        self.volume_extractor = MaskFeatures(3) if built_prior else None
        self.layer_weights = layer_weights
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.ignore_index = ignore_index
        self.num_slices = num_slices
        self.generator = generator

    def train(self, mode: bool = True) -> TopologyLoss:
        super().train(mode)
        self.feature_extractor.eval()  # a custom extractor's BatchNorm/Dropout must not switch to training
        return self

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
            target: label map ``(B, 1, *)`` / ``(B, *)`` or dense ``(B, C, *)`` with values in [0, 1].
        """
        if input.ndim not in (4, 5):
            raise ValueError(f"`input` must be 2D (B,C,H,W) or 3D (B,C,D,H,W), got shape {tuple(input.shape)}.")
        tgt = prepare_target(input, target, to_onehot_y=self.to_onehot_y, ignore_index=self.ignore_index)
        pred = activate(input, self.sigmoid, self.softmax, self.other_act)
        B, C = pred.shape[:2]
        first = 0 if self.include_background or C == 1 else 1
        p = pred.reshape(B, C, -1)[:, first:]
        if tgt.labels is not None:
            classes = torch.arange(first, C, device=pred.device).view(1, -1, 1)
            g = (tgt.labels.unsqueeze(1) == classes).float()  # the maps fed to the network, one per used class
        else:
            g = tgt.dense[:, first:]
        if tgt.weight is not None:
            w = tgt.weight if tgt.weight.shape[1] == 1 else tgt.weight[:, first:]
            p, g = p * w, g * w
        shape = (B, C - first, *pred.shape[2:])
        volume = pred.ndim == 5 and self.volume_extractor is not None
        f = topology_loss(
            p.reshape(shape),
            g.reshape(shape),
            self.volume_extractor if volume else self.feature_extractor,
            self.layer_weights,
            self.num_slices,
            self.generator,
            min_image_size(self.feature_extractor),
        )
        return reduce_loss(f, self.reduction, pred.ndim - 2)


class TopologyAwareLoss(CompoundLoss):
    r"""``pixel_loss(input, target) + mu * topology_loss(input, target)`` (Mosinska et al., CVPR 2018, eq. 3):

    .. math::

        \mathcal{L}(x, y) = \mathcal{L}_{\text{pixel}}(x, y) + \mu \, \mathcal{L}_{\text{top}}(x, y)

    A :class:`~segloss.losses.CompoundLoss` with terms ``"pixel"`` (weight 1) and ``"topology"`` (weight ``mu``):
    keyword arguments of ``forward`` such as ``weight_map`` reach the pixel loss only (``weight_map`` raises if
    its ``forward`` does not take it), the last term values are in :attr:`last_terms`, and ``set_weight("topology", mu)`` changes ``mu``
    (e.g. a warm-up schedule; ``mu=0`` skips the feature pass).

    Args:
        pixel_loss: any loss module taking ``(input, target)`` (segloss or MONAI), e.g. BCE or Dice+CE.
        mu: weight of the topology term (>= 0).
        topology_loss: a :class:`TopologyLoss` (or any loss module), a dict of :class:`TopologyLoss` keyword
            arguments, or None for ``TopologyLoss()``. Give it the same activation as the pixel loss.

    Example:
        >>> import monai
        >>> from segloss.losses import TopologyAwareLoss
        >>> _ = torch.manual_seed(0)
        >>> logits, mask = torch.randn(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
        >>> topo = {"sigmoid": True, "feature_extractor": torch.nn.Identity()}  # L_top: MSE of the probabilities
        >>> loss = TopologyAwareLoss(monai.losses.DiceLoss(sigmoid=True), mu=0.5, topology_loss=topo)
        >>> ref = monai.losses.DiceLoss(sigmoid=True)(logits, mask) + 0.5 * (logits.sigmoid() - mask).square().mean()
        >>> torch.allclose(loss(logits, mask), ref), sorted(loss.last_terms)
        (True, ['pixel', 'topology'])
    """

    def __init__(
        self,
        pixel_loss: nn.Module,
        mu: float = 0.1,
        topology_loss: nn.Module | Mapping | None = None,
    ) -> None:
        if topology_loss is None:
            topology_loss = TopologyLoss()
        elif isinstance(topology_loss, Mapping):
            topology_loss = TopologyLoss(**topology_loss)
        super().__init__(
            {"pixel": pixel_loss, "topology": topology_loss},
            {"pixel": 1.0, "topology": mu},
            term_kwargs={"topology": []},  # the perceptual term takes no weight map
        )

    @property
    def mu(self) -> float:
        return self.weights["topology"]
