"""Datalists for the bundles: ISBI 2012 PNG sections and NIfTI image/label pairs, with a synthetic fallback.

A datalist is MONAI's list of dicts ``[{"image": path, "label": path}, ...]``. The builders check that every
file exists up front and name the first missing one, so a run stops before training instead of in a worker.
:func:`resolve_dataset` returns a real data folder when it exists, else writes (once) a synthetic set in the same
layout, so a bundle reads both the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["isbi2012_datalist", "nifti_datalist", "parse_sections", "resolve_dataset", "split_datalist"]

logger = logging.getLogger(__name__)

# kind: (folder that marks the data, download helper, whether the helper takes the data folder's parent)
_KINDS = {
    "isbi2012_em": ("images", "download_isbi2012", False),
    "spleen_ct": ("imagesTr", "download_msd_spleen", True),  # writes root/Task09_Spleen
}


def parse_sections(sections: str | int | Iterable[int]) -> list[int]:
    """Section indices from ``"00-23"``, ``"0-3,7,9-10"``, an int or an iterable of ints."""
    if isinstance(sections, int):
        return [sections]
    if isinstance(sections, str):
        out: list[int] = []
        for part in sections.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise ValueError(f"`sections` must look like '00-23' or '0-3,7', got {sections!r}.")
            lo, hi = int(m[1]), int(m[2] or m[1])
            if hi < lo:
                raise ValueError(f"`sections` range {part!r} is empty.")
            out.extend(range(lo, hi + 1))
        return out
    return [int(s) for s in sections]


def _check_files(items: list[dict], keys: Sequence[str]) -> list[dict]:
    for item in items:
        for key in keys:
            if not Path(item[key]).is_file():
                raise FileNotFoundError(f"{key} file not found: {item[key]}")
    return items


def isbi2012_datalist(root: str | Path, sections: str | Iterable[int]) -> list[dict]:
    """``[{"image": root/images/NN.png, "label": root/labels/NN.png}]`` for the given sections.

    The ISBI 2012 layout (``images/``, ``labels/``, zero-padded ``NN.png``; label 0 = membrane). A section whose
    image or label is missing raises ``FileNotFoundError`` naming the file.
    """
    root = Path(root)
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"no ISBI 2012 `images/` folder in {root}")
    items = [
        {"image": str(root / "images" / f"{i:02d}.png"), "label": str(root / "labels" / f"{i:02d}.png")}
        for i in parse_sections(sections)
    ]
    return _check_files(items, ("image", "label"))


def nifti_datalist(
    root: str | Path,
    cases: Sequence[str] | None = None,
    images: str = "imagesTr",
    labels: str = "labelsTr",
) -> list[dict]:
    """Image/label pairs of a NIfTI data set, sorted by case name.

    With ``root/dataset.json`` (MSD layout, a ``training`` list) that list is used; otherwise every
    ``root/images/*.nii.gz`` is paired with the file of the same name in ``root/labels``. A missing label or
    image raises ``FileNotFoundError`` naming the file.

    Args:
        root: the data set folder.
        cases: keep only these case names (file names without ``.nii.gz``), in this order.
        images, labels: sub-folder names when there is no ``dataset.json``.
    """
    root = Path(root)
    meta = root / "dataset.json"
    if meta.is_file():
        training = json.loads(meta.read_text()).get("training", [])
        items = [{"image": str(root / d["image"]), "label": str(root / d["label"])} for d in training]
    else:
        if not (root / images).is_dir():
            raise FileNotFoundError(f"no `{images}/` folder (and no dataset.json) in {root}")
        # skip hidden files (e.g. macOS "._case.nii.gz" resource forks shipped in some archives)
        found = [p for p in (root / images).glob("*.nii*") if not p.name.startswith(".")]
        items = [{"image": str(p), "label": str(root / labels / p.name)} for p in found]
    by_case = {re.sub(r"\.nii(\.gz)?$", "", Path(d["image"]).name): d for d in items}
    if cases is not None:
        missing = [c for c in cases if c not in by_case]
        if missing:
            raise FileNotFoundError(f"cases not found in {root}: {missing} (have {sorted(by_case)})")
        items = [by_case[c] for c in cases]
    else:
        items = [by_case[c] for c in sorted(by_case)]
    if not items:
        raise FileNotFoundError(f"no NIfTI image/label pairs in {root}")
    return _check_files(items, ("image", "label"))


def split_datalist(items: Sequence[dict], num_val: int) -> tuple[list[dict], list[dict]]:
    """``(train, val)``: the last ``num_val`` items validate, the rest train (a contiguous split, no shuffle).

    With a single item (a smoke-test set) it is used for both, with a warning.
    """
    items = list(items)
    if num_val < 1:
        raise ValueError(f"`num_val` must be >= 1, got {num_val}.")
    if len(items) == 1:
        logger.warning("only one case: it is used for training and validation (smoke test only).")
        return items, items
    if num_val >= len(items):
        raise ValueError(f"`num_val`={num_val} leaves no training case out of {len(items)}.")
    return items[:-num_val], items[-num_val:]


def resolve_dataset(
    dataset_dir: str | Path | None,
    kind: str,
    work_dir: str | Path,
    synthetic: bool = True,
    seed: int = 0,
) -> str:
    """The folder to read ``kind`` data from: ``dataset_dir`` when it holds data, else a synthetic stand-in.

    Args:
        dataset_dir: the real data folder (``None`` or a missing folder means absent).
        kind: ``"isbi2012_em"`` (ISBI PNG layout) or ``"spleen_ct"`` (MSD NIfTI layout, label 1 = spleen).
        work_dir: where the synthetic set is written, as ``work_dir/synthetic_<kind>``; it is written once and
            reused. It is written to a temporary folder renamed into place, so a killed write leaves nothing
            half-done and concurrent ranks (``torchrun``) never read a half-written file.
        synthetic: allow the synthetic fallback; when False a missing ``dataset_dir`` raises
            ``FileNotFoundError`` saying how to get the data.
        seed: seed of the synthetic set.
    """
    if kind not in _KINDS:
        raise ValueError(f"`kind` must be one of {sorted(_KINDS)}, got {kind!r}.")
    marker, getter, takes_parent = _KINDS[kind]
    if dataset_dir is not None and (Path(dataset_dir) / marker).is_dir():
        return str(Path(dataset_dir))
    if not synthetic:
        folder = Path(dataset_dir if dataset_dir is not None else "<dataset_dir>").resolve()
        root = folder.parent if takes_parent else folder
        raise FileNotFoundError(
            f"{kind} data not found at {folder} (expected a `{marker}/` folder there). Get it with "
            f"`python -c \"import segloss.data as d; d.{getter}('{root}')\"` (segloss.data.{getter}; its "
            "docstring says how to place the files by hand when offline), point a bundle at the data with "
            "`--dataset_dir /path/to/data`, or ask for the synthetic stand-in with `--synthetic_fallback True` "
            "(resolve_dataset(..., synthetic=True))."
        )
    out = Path(work_dir) / f"synthetic_{kind}"
    if not out.is_dir():
        from segloss.data import synthetic as syn

        logger.warning(f"{kind} data not found at {dataset_dir}; writing a synthetic stand-in to {out}.")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not
        if kind == "isbi2012_em":
            syn.write_membrane_2d(tmp, num=30, size=256, seed=seed)
        else:
            syn.write_ct_3d(tmp, num=4, size=(96, 96, 96), seed=seed, structure="organ")
        try:
            os.rename(tmp, out)
        except OSError:  # another process renamed its identical copy first
            shutil.rmtree(tmp)
    return str(out)
