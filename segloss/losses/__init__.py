"""segloss losses. Every loss shares :mod:`segloss.losses.inputs` for activation, targets, masks and reduction."""

from segloss.losses._fused import set_fused_paths
from segloss.losses.compound import CompoundLoss
from segloss.losses.cross_entropy import WeightedCrossEntropyLoss, weighted_cross_entropy
from segloss.losses.dice import DiceLoss, GeneralizedDiceLoss, JaccardLoss, dice_loss, generalized_dice_loss
from segloss.losses.dice_ce import DiceCELoss, dice_ce_loss
from segloss.losses.dice_focal import DiceFocalLoss, dice_focal_loss
from segloss.losses.focal import FocalLoss, focal_loss
from segloss.losses.inputs import set_input_checks
from segloss.losses.lovasz import LovaszSoftmaxLoss, lovasz_softmax
from segloss.losses.lovasz_hinge import LovaszHingeLoss, lovasz_hinge
from segloss.losses.schedule import TermWeightSchedule
from segloss.losses.skeleton_recall import SkeletonRecallLoss
from segloss.losses.topology import TopologyAwareLoss, TopologyLoss
from segloss.losses.tversky import FocalTverskyLoss, TverskyLoss, focal_tversky_loss, tversky_loss

__all__ = ["CompoundLoss", "set_fused_paths", "set_input_checks"]
__all__ += ["SkeletonRecallLoss", "TopologyAwareLoss", "TopologyLoss"]
__all__ += ["FocalLoss", "WeightedCrossEntropyLoss", "focal_loss", "weighted_cross_entropy"]
__all__ += ["DiceCELoss", "DiceFocalLoss", "DiceLoss", "GeneralizedDiceLoss", "JaccardLoss"]
__all__ += ["dice_ce_loss", "dice_focal_loss", "dice_loss", "generalized_dice_loss"]
__all__ += ["FocalTverskyLoss", "TverskyLoss", "focal_tversky_loss", "tversky_loss"]
__all__ += ["LovaszHingeLoss", "LovaszSoftmaxLoss", "TermWeightSchedule", "lovasz_hinge", "lovasz_softmax"]
