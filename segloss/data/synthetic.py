"""Deterministic synthetic thin-structure data with exact labels, and writers that lay it out like the real data.

Two generators, both seeded through :class:`numpy.random.SeedSequence` so that sample ``i`` depends only on
``(seed, i)``: ``membrane_2d(5, seed=s)`` is the first five samples of ``membrane_2d(30, seed=s)``.

- :func:`membrane_2d`: EM-like sections of a cell network (a warped Voronoi tessellation) whose thin (2-4 px)
  membranes are darker than the cell interiors, with dark intracellular organelles as distractors, blur and
  noise. Stand-in for the ISBI 2012 EM stack (Cardona et al., PLoS Biol 2010).
- :func:`vessels_3d`: CT-like volumes in Hounsfield units (air, fat, soft tissue, a bone column) with a
  contrast-filled branching vessel tree and, optionally, a spleen-like organ blob.

The writers put a synthetic set on disk in the layout of the real data, so one loader serves both:
:func:`write_membrane_2d` writes ISBI-style PNGs (``images/NN.png``, ``labels/NN.png`` with **label 0 =
membrane**, 255 = cell, the ISBI polarity) and :func:`write_ct_3d` writes an MSD-style NIfTI set (``imagesTr/``,
``labelsTr/``, ``dataset.json``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["membrane_2d", "vessels_3d", "write_ct_3d", "write_membrane_2d"]

# Label values of vessels_3d.
VESSEL, ORGAN = 1, 2


def _rngs(num: int, seed: int) -> list[np.random.Generator]:
    if num < 0:
        raise ValueError(f"`num` must be >= 0, got {num}.")
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(num)]


def _shape(size: int | Sequence[int], ndim: int, name: str = "size") -> tuple[int, ...]:
    shape = (int(size),) * ndim if np.isscalar(size) else tuple(int(s) for s in size)
    if len(shape) != ndim or min(shape) < 16:
        raise ValueError(f"`{name}` must be an int or {ndim} ints, each >= 16, got {size!r}.")
    return shape


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation: a smooth random field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-12)


# ---------------------------------------------------------------------------------------------------- 2D membranes


def _membrane_section(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    # Cell centres on a jittered grid: cells of varied size but no slivers. ~36 px spacing, like ISBI at 256 px.
    spacing = rng.uniform(30.0, 42.0)
    gy, gx = np.meshgrid(np.arange(-1, h / spacing + 1), np.arange(-1, w / spacing + 1), indexing="ij")
    centres = (np.stack([gy.ravel(), gx.ravel()], 1) + 0.5 + rng.uniform(-0.42, 0.42, (gy.size, 2))) * spacing
    # A smooth displacement of the query grid makes the Voronoi edges wavy, like real membranes.
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    amp = rng.uniform(2.0, 5.0)
    yy += amp * _smooth_noise(rng, shape, 12.0)
    xx += amp * _smooth_noise(rng, shape, 12.0)
    _, cell = cKDTree(centres).query(np.stack([yy.ravel(), xx.ravel()], 1))
    cell = cell.reshape(shape)
    # Pixels with a 4-neighbour in another cell: a 2 px line along each cell border; widen it by a smooth radius
    # field r in [0, 1.5] px so the membrane is 2-4 px thick.
    edge = np.zeros(shape, bool)
    dy, dx = cell[1:] != cell[:-1], cell[:, 1:] != cell[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    radius = np.clip(rng.uniform(0.6, 1.0) + 0.35 * _smooth_noise(rng, shape, 20.0), 0.0, 1.5)
    membrane = ndimage.distance_transform_edt(~edge) <= radius

    # Cell interiors: a per-cell brightness and a smooth texture; membranes dark.
    brightness = rng.uniform(0.55, 0.8, len(centres))[cell]
    image = brightness + 0.04 * _smooth_noise(rng, shape, 3.0)
    # Dark organelles (mitochondria, vesicles) inside cells, kept off the membranes: label stays "cell".
    n_blobs = rng.poisson(h * w / 2500)
    by, bx = rng.uniform(0, h, n_blobs), rng.uniform(0, w, n_blobs)
    br = rng.uniform(1.5, 4.0, n_blobs)
    blobs = np.zeros(shape, bool)
    for y, x, r in zip(by, bx, br):
        y0, y1, x0, x1 = int(max(y - r - 1, 0)), int(min(y + r + 2, h)), int(max(x - r - 1, 0)), int(min(x + r + 2, w))
        blobs[y0:y1, x0:x1] |= (np.arange(y0, y1)[:, None] - y) ** 2 + (np.arange(x0, x1)[None, :] - x) ** 2 <= r * r
    blobs &= ndimage.distance_transform_edt(~membrane) > 3
    image[blobs] = rng.uniform(0.35, 0.5)
    image[membrane] = rng.uniform(0.18, 0.3) + 0.03 * _smooth_noise(rng, shape, 2.0)[membrane]
    image = ndimage.gaussian_filter(image, rng.uniform(0.7, 1.2))
    image += rng.uniform(0.03, 0.06) * rng.standard_normal(shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), membrane.astype(np.uint8)


def membrane_2d(num: int, size: int | Sequence[int] = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic EM sections of a cell network with thin membranes.

    Each section is a Voronoi tessellation (jittered-grid centres, ~36 px apart) on a smoothly warped grid. The
    cell borders, widened to 2-4 px, are the membranes (label 1); cell interiors (label 0) get a per-cell
    brightness, texture and dark organelles. The image is then blurred (sigma 0.7-1.2 px) and Gaussian noise is
    added, so membranes are dark, thin and connected, as in the ISBI 2012 stack.

    Args:
        num: number of sections.
        size: ``H`` (square) or ``(H, W)``, each >= 16.
        seed: seed; section ``i`` depends only on ``(seed, i)``.

    Returns:
        ``images`` ``(num, 1, H, W)`` float32 in ``[0, 1]`` and ``labels`` ``(num, 1, H, W)`` uint8
        (1 = membrane, 0 = cell).
    """
    shape = _shape(size, 2)
    pairs = [_membrane_section(rng, shape) for rng in _rngs(num, seed)]
    images = np.zeros((num, 1, *shape), np.float32)
    labels = np.zeros((num, 1, *shape), np.uint8)
    for i, (img, lab) in enumerate(pairs):
        images[i, 0], labels[i, 0] = img, lab
    return images, labels


# ---------------------------------------------------------------------------------------------------- 3D vessels


def _segment_distance(grid: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of points ``grid`` (..., 3) to the segment p0-p1, and the position t in [0, 1] along it."""
    d = p1 - p0
    t = np.clip(((grid - p0) @ d) / max(float(d @ d), 1e-12), 0.0, 1.0)
    return np.linalg.norm(grid - p0 - t[..., None] * d, axis=-1), t


def _paint_capsule(mask: np.ndarray, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> None:
    """Set the voxels of a tapered capsule (radius r0 at p0 to r1 at p1) in ``mask``; clipped to the volume."""
    r = max(r0, r1)
    lo = np.maximum(np.floor(np.minimum(p0, p1) - r - 1), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(p0, p1) + r + 2), mask.shape).astype(int)
    if np.any(hi <= lo):
        return
    axes = [np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    dist, t = _segment_distance(grid, p0, p1)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= dist <= r0 + t * (r1 - r0)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _vessel_tree(
    rng: np.random.Generator, shape: tuple[int, int, int], start: np.ndarray, body: np.ndarray
) -> np.ndarray:
    """A branching tree of tapered capsules inside the body mask, reduced to its connected component holding
    the root (a branch may leave the body and re-enter it)."""
    mask = np.zeros(shape, bool)
    scale = min(shape) / 96.0
    stack = [(start, _unit(np.array([0.15, 0.1, 1.0]) + 0.2 * rng.standard_normal(3)), 3.0, 24.0 * scale, 0)]
    while stack:
        p, direction, radius, length, depth = stack.pop()
        # Each branch is a slightly curved polyline of 3 pieces, tapering by 20 %.
        end_radius = max(radius * 0.8, 1.0)
        for k in range(3):
            direction = _unit(direction + 0.25 * rng.standard_normal(3))
            q = p + direction * length / 3
            r_a = radius + (end_radius - radius) * k / 3
            _paint_capsule(mask, p, q, r_a, radius + (end_radius - radius) * (k + 1) / 3)
            p = q
        inside = np.all(p >= 0) and np.all(p <= np.array(shape) - 1)
        if depth < 4 and inside:
            # Two children, 25-50 degrees off the parent axis, on opposite sides of a random plane.
            normal = _unit(np.cross(direction, rng.standard_normal(3)))
            for sign in (1.0, -1.0):
                angle = np.deg2rad(rng.uniform(25, 50))
                child = _unit(np.cos(angle) * direction + sign * np.sin(angle) * normal)
                stack.append((p, child, max(end_radius * 0.8, 1.0), length * rng.uniform(0.7, 0.9), depth + 1))
    components, _ = ndimage.label(mask & body, np.ones((3, 3, 3)))
    root = components[tuple(np.clip(np.rint(start).astype(int), 0, np.array(shape) - 1))]
    return components == root  # the root voxel lies inside the body, on the trunk's axis


def _ct_volume(rng: np.random.Generator, shape: tuple[int, int, int], organ: bool) -> tuple[np.ndarray, np.ndarray]:
    sx, sy, sz = shape
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    # Body: an elliptic cylinder along z (the last, axial axis), with a fat rim and a bone column at the back.
    cx, cy = sx / 2 + rng.uniform(-2, 2), sy / 2 + rng.uniform(-2, 2)
    ax, ay = sx * rng.uniform(0.42, 0.47), sy * rng.uniform(0.34, 0.4)
    rho = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    hu = np.full(shape, -1000.0)
    hu[rho <= 1.0] = -100.0
    hu[rho <= 0.9] = 40.0
    hu += np.where(rho <= 0.9, 12.0 * _smooth_noise(rng, shape, 4.0), 0.0)
    bone = ((x - cx) / (0.12 * sx)) ** 2 + ((y - (cy + 0.7 * ay)) / (0.1 * sy)) ** 2 <= 1.0
    hu[bone] = 700.0

    organ_mask = np.zeros(shape, bool)
    if organ:
        # A spleen-like blob: an ellipsoid with a smoothly perturbed surface, on one side of the body.
        c = np.array(
            [cx + 0.45 * ax * rng.choice([-1, 1]), cy + rng.uniform(-0.1, 0.2) * ay, sz * rng.uniform(0.4, 0.6)]
        )
        radii = np.array([0.18 * sx, 0.14 * sy, 0.2 * sz]) * rng.uniform(0.85, 1.15, 3)
        r = np.sqrt(((x - c[0]) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2 + ((z - c[2]) / radii[2]) ** 2)
        organ_mask = (r + 0.12 * _smooth_noise(rng, shape, 6.0) <= 1.0) & (rho <= 0.9)
        hu[organ_mask] = rng.uniform(100.0, 130.0)

    # Vessel tree from near the bottom of the body, in front of the bone column.
    start = np.array([cx + rng.uniform(-0.2, 0.2) * ax, cy - rng.uniform(0.0, 0.3) * ay, rng.uniform(2, 0.15 * sz)])
    vessel = _vessel_tree(rng, shape, start, rho <= 0.9)
    hu[vessel] = rng.uniform(250.0, 350.0)

    # Partial-volume blur, then scanner noise; stored as int16 HU like real CT.
    hu = ndimage.gaussian_filter(hu, 0.6) + rng.uniform(10.0, 20.0) * rng.standard_normal(shape)
    labels = np.zeros(shape, np.uint8)
    labels[organ_mask] = ORGAN
    labels[vessel] = VESSEL
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels


def vessels_3d(
    num: int, size: int | Sequence[int] = (96, 96, 96), seed: int = 0, organ: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic CT-like volumes with a branching, contrast-filled vessel tree and a spleen-like organ.

    The body is an elliptic cylinder along the last (axial) axis: air -1000 HU outside, a fat rim -100 HU, soft
    tissue ~40 HU with smooth texture, and a bone column 700 HU. The vessel tree (250-350 HU) is a binary tree of
    depth 4 of tapered, slightly curved capsules (radius 3 down to 1 voxel), connected by construction. The organ
    (100-130 HU) is an ellipsoid with a perturbed surface. The volume is blurred (sigma 0.6 voxel) and 10-20 HU
    Gaussian noise is added.

    Args:
        num: number of volumes.
        size: edge length or ``(X, Y, Z)``, each >= 16; axis order is the NIfTI array order (z axial).
        seed: seed; volume ``i`` depends only on ``(seed, i)``.
        organ: add the organ blob (label 2).

    Returns:
        ``images`` ``(num, 1, X, Y, Z)`` int16 HU and ``labels`` ``(num, 1, X, Y, Z)`` uint8: 0 background,
        1 vessel, 2 organ (vessels are painted over the organ).
    """
    shape = _shape(size, 3)
    images = np.zeros((num, 1, *shape), np.int16)
    labels = np.zeros((num, 1, *shape), np.uint8)
    for i, rng in enumerate(_rngs(num, seed)):
        images[i, 0], labels[i, 0] = _ct_volume(rng, shape, organ)
    return images, labels


# ---------------------------------------------------------------------------------------------------- writers


def write_membrane_2d(root: str | Path, num: int = 30, size: int | Sequence[int] = 256, seed: int = 0) -> Path:
    """Write :func:`membrane_2d` sections in the ISBI 2012 PNG layout and return ``root``.

    ``root/images/NN.png`` (8-bit greyscale) and ``root/labels/NN.png`` with the ISBI polarity: **0 = membrane**,
    255 = cell, so the loader of the real stack (``label == 0`` is the membrane) reads both.
    """
    from PIL import Image

    root = Path(root)
    images, labels = membrane_2d(num, size, seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(num - 1)))
    for i in range(num):
        name = f"{i:0{width}d}.png"
        Image.fromarray(np.rint(images[i, 0] * 255).astype(np.uint8)).save(root / "images" / name)
        Image.fromarray(np.where(labels[i, 0] == 1, 0, 255).astype(np.uint8)).save(root / "labels" / name)
    (root / "README.md").write_text(
        f"Synthetic EM membranes from segloss.data.synthetic.membrane_2d(num={num}, size={size!r}, seed={seed}).\n"
        "ISBI 2012 layout and polarity: images/NN.png, labels/NN.png, label 0 = membrane, 255 = cell.\n"
    )
    return root


def write_ct_3d(
    root: str | Path,
    num: int = 4,
    size: int | Sequence[int] = (96, 96, 96),
    seed: int = 0,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    structure: str = "organ",
) -> Path:
    """Write :func:`vessels_3d` volumes as an MSD-style NIfTI set and return ``root``.

    ``root/imagesTr/case_NNN.nii.gz`` (int16 HU), ``root/labelsTr/case_NNN.nii.gz`` (uint8) and
    ``root/dataset.json`` (MSD keys, ``training`` list with ``./imagesTr/...`` paths). The affine is
    ``diag(spacing)`` (RAS).

    Args:
        structure: what label 1 marks: ``"organ"`` (the spleen-like blob, MSD Task09 style; label 0 elsewhere),
            ``"vessel"`` (the vessel tree) or ``"all"`` (1 vessel, 2 organ).
    """
    import nibabel as nib

    if structure not in ("organ", "vessel", "all"):
        raise ValueError(f"`structure` must be 'organ', 'vessel' or 'all', got {structure!r}.")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"`spacing` must be 3 positive numbers, got {spacing!r}.")
    root = Path(root)
    images, labels = vessels_3d(num, size, seed, organ=structure != "vessel")
    if structure == "organ":
        labels = (labels == ORGAN).astype(np.uint8)
    names = {"organ": {"0": "background", "1": "spleen"}, "vessel": {"0": "background", "1": "vessel"}}
    affine = np.diag([*spacing, 1.0])
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(num):
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(images[i, 0], affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(labels[i, 0], affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": f"segloss synthetic CT ({structure})",
        "description": f"segloss.data.synthetic.vessels_3d(num={num}, size={size!r}, seed={seed})",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": names.get(structure, {"0": "background", "1": "vessel", "2": "organ"}),
        "numTraining": num,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root
