"""MONAI transforms making the extra targets of segloss losses: voxel weight maps and skeletons.

Array forms take one channel-first label ``(1, *spatial)``; dictionary forms (``...d``) write the result under a
new key. Transforms never import :mod:`segloss.losses`.
"""

from segloss.transforms.array import (
    BorderWeightMap,
    ClassWeightMap,
    Skeletonize,
    balanced_class_weights,
    binary_skeleton,
    border_weight_map,
    class_weight_map,
    label_skeleton,
)
from segloss.transforms.dictionary import (
    BorderWeightMapD,
    BorderWeightMapd,
    BorderWeightMapDict,
    ClassWeightMapD,
    ClassWeightMapd,
    ClassWeightMapDict,
    SkeletonizeD,
    Skeletonized,
    SkeletonizeDict,
)

__all__ = [
    "BorderWeightMap",
    "BorderWeightMapD",
    "BorderWeightMapDict",
    "BorderWeightMapd",
    "ClassWeightMap",
    "ClassWeightMapD",
    "ClassWeightMapDict",
    "ClassWeightMapd",
    "Skeletonize",
    "SkeletonizeD",
    "SkeletonizeDict",
    "Skeletonized",
    "balanced_class_weights",
    "binary_skeleton",
    "border_weight_map",
    "class_weight_map",
    "label_skeleton",
]
