"""Dictionary forms of :mod:`segloss.transforms.array` (MONAI ``MapTransform`` conventions).

Each reads the label under each of ``keys`` and writes the result under a new key (``weight_key`` /
``skeleton_key``), leaving the label untouched, so the loss can get both. With several ``keys``, give one output
key per input key.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep

from segloss.transforms.array import BorderWeightMap, ClassWeightMap, Skeletonize

__all__ = [
    "BorderWeightMapD",
    "BorderWeightMapDict",
    "BorderWeightMapd",
    "ClassWeightMapD",
    "ClassWeightMapDict",
    "ClassWeightMapd",
    "SkeletonizeD",
    "SkeletonizeDict",
    "Skeletonized",
]


class _DerivedMapd(MapTransform):
    """Applies ``self.transform`` to ``data[key]`` and stores the result under the matching output key."""

    def __init__(self, keys: KeysCollection, out_keys, out_name: str, allow_missing_keys: bool) -> None:
        super().__init__(keys, allow_missing_keys)
        try:
            self.out_keys = ensure_tuple_rep(out_keys, len(self.keys))
        except ValueError:  # a sequence of the wrong length
            self.out_keys = ()
        if len(set(self.out_keys)) != len(self.keys):  # a single key repeated for several inputs would be overwritten
            raise ValueError(
                f"`{out_name}` must give one distinct output key per input key ({len(self.keys)} keys), got {out_keys}."
            )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.out_keys):
            d[out_key] = self.transform(d[key])
        return d


class ClassWeightMapd(_DerivedMapd):
    """Dictionary form of :class:`~segloss.transforms.ClassWeightMap`: ``d[weight_key] = ClassWeightMap(d[key])``.

    Args:
        keys: label key(s); weight_key: output key(s), one per key (default ``"weight_map"``);
        num_classes, clip, ignore_index: as :class:`~segloss.transforms.ClassWeightMap`;
        allow_missing_keys: skip absent keys instead of raising ``KeyError``.
    """

    backend = ClassWeightMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        weight_key: str | Sequence[str] = "weight_map",
        num_classes: int | None = None,
        clip: float | tuple[float, float] | None = None,
        ignore_index: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, weight_key, "weight_key", allow_missing_keys)
        self.transform = ClassWeightMap(num_classes=num_classes, clip=clip, ignore_index=ignore_index)


class BorderWeightMapd(_DerivedMapd):
    """Dictionary form of :class:`~segloss.transforms.BorderWeightMap`: ``d[weight_key] = BorderWeightMap(d[key])``.

    Args:
        keys: label key(s); weight_key: output key(s), one per key (default ``"weight_map"``);
        w0, sigma, object_labels, class_weight, spacing: as :class:`~segloss.transforms.BorderWeightMap`;
        allow_missing_keys: skip absent keys instead of raising ``KeyError``.
    """

    backend = BorderWeightMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        weight_key: str | Sequence[str] = "weight_map",
        w0: float = 10.0,
        sigma: float = 5.0,
        object_labels: Sequence[int] | None = None,
        class_weight: str | Sequence[float] | None = "balanced",
        spacing: float | Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, weight_key, "weight_key", allow_missing_keys)
        self.transform = BorderWeightMap(
            w0=w0, sigma=sigma, object_labels=object_labels, class_weight=class_weight, spacing=spacing
        )


class Skeletonized(_DerivedMapd):
    """Dictionary form of :class:`~segloss.transforms.Skeletonize`: ``d[skeleton_key] = Skeletonize(d[key])``.

    Args:
        keys: label key(s); skeleton_key: output key(s), one per key (default ``"skeleton"``);
        include_background, dilation, num_classes: as :class:`~segloss.transforms.Skeletonize`;
        allow_missing_keys: skip absent keys instead of raising ``KeyError``.
    """

    backend = Skeletonize.backend

    def __init__(
        self,
        keys: KeysCollection,
        skeleton_key: str | Sequence[str] = "skeleton",
        include_background: bool = False,
        dilation: int = 0,
        num_classes: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, skeleton_key, "skeleton_key", allow_missing_keys)
        self.transform = Skeletonize(include_background=include_background, dilation=dilation, num_classes=num_classes)


ClassWeightMapD = ClassWeightMapDict = ClassWeightMapd
BorderWeightMapD = BorderWeightMapDict = BorderWeightMapd
SkeletonizeD = SkeletonizeDict = Skeletonized
