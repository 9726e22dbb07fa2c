"""Train :class:`segloss.networks.MaskFeatures`, the mask-domain topology prior shipped with segloss.

Data: label masks only. 2D: ISBI 2012 label sections 00-23 (membrane = label value 0 in the PNGs; sections 24-29
are never read) and ``segloss.data.synthetic.membrane_2d`` sections, random 128^2 crops with flips and 90 degree
turns, batch 8. 3D: 8 ``segloss.data.synthetic.vessels_3d`` vessel trees (64^3), random 32^3 crops centred near a
vessel voxel, batch 4.

Each step corrupts every label ``g`` in the batch (:func:`corruptions`):

- topological errors: cuts across the structure (a ball on the skeleton, radius = local half-width + 1-4 px),
  false bridges (a segment across a cell / between two vessels, joining the structure at both ends) and
  spurious fragments (a free segment);
- harmless errors with the pixel count of the cuts (resp. bridges): border thinning (where the structure keeps a
  core) and thickening, in contiguous patches, every flip a simple point (:func:`is_simple`), so that no Betti
  number changes.

Objective (``L = L_rank + a L_grad + 0.01 log(d_soft)^2``, ``a = --align-weight``: 4 for the shipped 2D weights,
1 for the 3D ones; ``margin = --margin``, 30), with ``d(x) = sum_n mean((f_n(x) - f_n(g))^2)`` the term of
:class:`segloss.losses.TopologyLoss`:

- ``L_rank``: ``softplus(log margin - log((d(topo)/n_topo) / (d(harmless)/n_harmless)))`` for (cut, bridge) x
  (thinning, thickening) pairs on hard masks: a topological error must cost ``margin`` times more per flipped pixel;
- ``L_grad``: on a *soft* imperfect prediction ``p`` (harmless noise, cuts and bridges, partial probabilities in
  the gaps, blurred, rescaled to [lo, hi]), ``1 - cos(-dd/dp, D)`` with ``D = +1`` on the cut pixels and ``-1``
  on the bridge / fragment pixels, 0 elsewhere: the term's gradient must push probability into the gaps and out of
  the bridges, and nowhere else. This is what makes it useful as a training term; the ranking alone is not enough;
- the last term keeps ``d`` of the soft predictions near 1 (the two others ignore the feature scale);
- with ``--selectivity-weight w`` (0, off, for the shipped weights), also ``w softplus(log 10 - log(s))`` where
  ``s`` is the mean ``|dd/dp|`` on the cut pixels over its mean on the harmless-noise pixels of the soft
  prediction: the gradient must push a gap 10x harder than a border. Tried with w = 1 and 4; not shipped
  (``docs/mask_features.md``).

Adam (lr 2e-3, cosine decay; by default 700 steps in 2D, 300 in 3D), filters rescaled to norm sqrt(2) after each
step, the per-map output scales learnt in log space, fixed seed, ``torch.set_num_threads(1)``. At the end the output
maps are scaled so that ``d`` of the soft predictions is about 1, and the state dict is saved with its SHA-256
printed. The shipped files were made by the first two commands:

    python benchmarks/train_mask_features.py --dims 2 --out segloss/networks/mask_features_2d.pt
    python benchmarks/train_mask_features.py --dims 3 --steps 1500 --align-weight 1 --out segloss/networks/mask_features_3d.pt
    python benchmarks/train_mask_features.py --dims 2 --steps 5 --out /tmp/mf.pt     # smoke run
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from segloss.data.synthetic import VESSEL, membrane_2d, vessels_3d
from segloss.losses.topology import feature_distance
from segloss.networks import MaskFeatures

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ISBI = Path(os.environ.get("SEGLOSS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "isbi2012_em"
TRAIN_SECTIONS = tuple(range(24))  # 24-29 are held out for evaluation
MARGIN = 30.0
ALIGN_WEIGHT = 4.0
SELECTIVITY = 10.0  # wanted mean |gradient| on a cut pixel over that on a harmless-noise pixel


# ---------------------------------------------------------------------------------------------------- data


def isbi_membranes(root: Path, sections=TRAIN_SECTIONS) -> np.ndarray:
    """``(S, H, W)`` bool membrane masks (label value 0) of the given ISBI 2012 sections."""
    return np.stack([np.array(Image.open(Path(root) / "labels" / f"{s:02d}.png")) == 0 for s in sections])


def random_crop(rng: np.random.Generator, masks: np.ndarray, size: int) -> np.ndarray:
    """A random crop of a random mask, randomly flipped along each axis and with the first two axes swapped. 3D
    crops are centred near a random foreground voxel (a vessel tree fills ~0.3 % of its volume)."""
    m = masks[rng.integers(len(masks))]
    if m.ndim == 3:
        fg = np.argwhere(m)
        centre = fg[rng.integers(len(fg))] + rng.integers(-size // 4, size // 4 + 1, 3)
        start = [int(np.clip(c - size // 2, 0, s - size)) for c, s in zip(centre, m.shape)]
    else:
        start = [rng.integers(0, s - size + 1) for s in m.shape]
    crop = m[tuple(slice(a, a + size) for a in start)]
    for axis in range(crop.ndim):
        if rng.random() < 0.5:
            crop = np.flip(crop, axis)
    if rng.random() < 0.5:
        crop = crop.swapaxes(0, 1)
    return np.ascontiguousarray(crop)


# ---------------------------------------------------------------------------------------------------- corruptions


def _balls(shape, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of balls (any dimension)."""
    out = np.zeros(shape, bool)
    for c, r in zip(centres, radii):
        lo = np.maximum(np.floor(c - r), 0).astype(int)
        hi = np.minimum(np.ceil(c + r) + 1, shape).astype(int)
        if np.any(hi <= lo):  # a ball wholly outside the array
            continue
        grid = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
        inside = sum((x - ci) ** 2 for x, ci in zip(grid, c)) <= r * r
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] |= inside
    return out


def _interior(shape, margin: int) -> np.ndarray:
    keep = np.zeros(shape, bool)
    keep[tuple(slice(margin, s - margin) for s in shape)] = True
    return keep


def cuts(rng: np.random.Generator, g: np.ndarray, num: int, extra=(1.0, 4.0), margin: int = 6) -> np.ndarray:
    """Pixels of ``g`` removed by ``num`` cuts: balls on the skeleton, radius = half-width + U(extra)."""
    skel = skeletonize(g) & _interior(g.shape, margin)
    pts = np.argwhere(skel)
    if len(pts) == 0:
        return np.zeros_like(g)
    pts = pts[rng.choice(len(pts), min(num, len(pts)), replace=False)]
    half = ndimage.distance_transform_edt(g)[tuple(pts.T)]
    return _balls(g.shape, pts.astype(float), half + rng.uniform(*extra, len(pts))) & g


_NEIGHBOURS_2D = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@functools.cache
def _simple_points_2d() -> np.ndarray:
    """For each of the 256 patterns of a pixel's 8 neighbours (bit i = ``_NEIGHBOURS_2D[i]`` is foreground): is the
    pixel simple, i.e. does flipping it keep the topology (:func:`is_simple`)?"""
    table = np.zeros(256, bool)
    for code in range(256):
        window = np.zeros((3, 3), bool)
        for bit, (dy, dx) in enumerate(_NEIGHBOURS_2D):
            window[1 + dy, 1 + dx] = bool(code >> bit & 1)
        table[code] = is_simple(window)
    return table


def is_simple(window: np.ndarray) -> bool:
    """Is the centre of a 3x3 (3x3x3) window a simple point: does flipping it leave the number of foreground
    components (full connectivity, 8 / 26) and of background components (the dual 4 / 6) unchanged, and so every
    Betti number of :func:`segloss.metrics.betti_numbers`? The test of Bertrand's topological numbers: the
    neighbours (centre excluded) form exactly one foreground component, and the background neighbours that share a
    face with the centre lie in exactly one dual component of the background within the window (in 3D, within
    the 18-neighbourhood: the window without its corners)."""
    ndim, centre = window.ndim, (1,) * window.ndim
    fg = window.copy()
    fg[centre] = False
    num_fg = ndimage.label(fg, ndimage.generate_binary_structure(ndim, ndim))[1]
    offsets = np.indices((3,) * ndim).reshape(ndim, -1).T - 1
    bg = ~fg
    bg[centre] = False
    if ndim == 3:  # the background is taken within the 18-neighbourhood: without the corners
        bg[tuple((offsets[np.abs(offsets).sum(1) == 3] + 1).T)] = False
    labels = ndimage.label(bg, ndimage.generate_binary_structure(ndim, 1))[0]
    faces = offsets[np.abs(offsets).sum(1) == 1] + 1
    return num_fg == 1 and len(set(labels[tuple(faces.T)].tolist()) - {0}) == 1


def _flip_is_simple(mask: np.ndarray, p: np.ndarray) -> bool:
    window = mask[tuple(slice(i - 1, i + 2) for i in p)]
    if mask.ndim == 2:
        code = sum(int(window[1 + dy, 1 + dx]) << bit for bit, (dy, dx) in enumerate(_NEIGHBOURS_2D))
        return bool(_simple_points_2d()[code])
    return is_simple(window)


def harmless(rng: np.random.Generator, g: np.ndarray, count: int, kind: str) -> np.ndarray:
    """Up to ``count`` pixels to flip that keep the topology, in contiguous patches: ``"thin"`` removes border
    pixels next to a core of ``g``, ``"thick"`` adds pixels just outside ``g``. The pixels are flipped one at a
    time, nearest to a few random centres first, each only if it is a simple point of the mask as flipped so far
    (:func:`is_simple`), so every Betti number of the result equals that of ``g``. (Without that test, thinning a
    membrane where it is two or three pixels wide broke it: the held-out thinning of ``topology_prior.py`` had a
    Betti error of 8 per 256^2 crop against 27 for the cuts, in 3D more than the cuts.) Fewer than ``count``
    pixels when the candidates run out."""
    full = ndimage.generate_binary_structure(g.ndim, g.ndim)
    if kind == "thin":
        core = ndimage.binary_erosion(g, full)
        cand = g & ~core & ndimage.binary_dilation(core, full)
    elif kind == "thick":
        cand = ndimage.binary_dilation(g, full) & ~g
    else:
        raise ValueError(f"`kind` must be 'thin' or 'thick', got {kind!r}.")
    pts = np.argwhere(cand & _interior(g.shape, 2))
    out = np.zeros_like(g)
    if count <= 0 or len(pts) == 0:
        return out
    centres = pts[rng.choice(len(pts), max(1, len(pts) // 150), replace=False)]
    dist, _ = cKDTree(centres).query(pts)
    mask, flipped = g.copy(), 0
    for p in pts[np.argsort(dist + rng.uniform(0, 0.5, len(pts)), kind="stable")]:
        if _flip_is_simple(mask, p):
            mask[tuple(p)] = not mask[tuple(p)]
            out[tuple(p)] = True
            flipped += 1
            if flipped == count:
                break
    return out


def bridges(rng: np.random.Generator, g: np.ndarray, num: int, max_len: float = 40.0) -> np.ndarray:
    """Pixels outside ``g`` of ``num`` false structures: a segment through free space joining ``g`` at both ends
    (a false bridge, a new cycle) when one fits within ``max_len``, else a free fragment (a new component)."""
    out = np.zeros_like(g)
    free = ndimage.distance_transform_edt(~g)
    seeds = np.argwhere((free >= 3) & _interior(g.shape, 4))
    if len(seeds) == 0:
        return out
    t = np.arange(0.0, max_len, 0.5)
    shape = np.array(g.shape)
    for q in seeds[rng.choice(len(seeds), min(num, len(seeds)), replace=False)].astype(float):
        direction = rng.standard_normal(g.ndim)
        direction /= np.linalg.norm(direction)
        ends = []
        for sign in (1.0, -1.0):
            ray = q + sign * t[:, None] * direction
            inside = np.all((ray >= 0) & (ray <= shape - 1), 1)
            hit = np.flatnonzero(~inside | g[tuple(np.rint(np.clip(ray, 0, shape - 1)).astype(int).T)])
            ends.append(t[hit[0]] if len(hit) and inside[hit[0]] else None)
        radius = rng.uniform(0.8, 1.6)
        if ends[0] is not None and ends[1] is not None and ends[0] + ends[1] <= max_len:
            a, b = q + ends[0] * direction, q - ends[1] * direction
        else:  # a fragment that stays clear of g
            half = min(rng.uniform(3.0, 8.0), free[tuple(q.astype(int))] - radius - 1.5)
            a, b = q + half * direction, q - half * direction
        n = int(np.linalg.norm(b - a) * 2) + 2
        line = a + np.linspace(0, 1, n)[:, None] * (b - a)
        out |= _balls(g.shape, line, np.full(n, radius))
    return out & ~g


def bridges_between(rng: np.random.Generator, g: np.ndarray, num: int, reach=(5.0, 16.0)) -> np.ndarray:
    """Voxels outside ``g`` of ``num`` false bridges between two skeleton points of ``g`` that are ``reach`` apart
    and whose straight join runs mostly through free space (for sparse 3D trees, where a random ray rarely meets
    the structure twice)."""
    out = np.zeros_like(g)
    pts = np.argwhere(skeletonize(g) & _interior(g.shape, 3)).astype(float)
    if len(pts) < 2:
        return out
    tree = cKDTree(pts)
    for i in rng.permutation(len(pts))[: 20 * num]:
        if num == 0:
            break
        near = [j for j in tree.query_ball_point(pts[i], reach[1]) if np.linalg.norm(pts[j] - pts[i]) >= reach[0]]
        if not near:
            continue
        a, b = pts[i], pts[near[rng.integers(len(near))]]
        line = a + np.linspace(0, 1, int(np.linalg.norm(b - a) * 2) + 2)[:, None] * (b - a)
        if g[tuple(np.rint(line).astype(int).T)].mean() > 0.4:  # mostly along the structure: not a bridge
            continue
        out |= _balls(g.shape, line, np.full(len(line), rng.uniform(0.8, 1.5)))
        num -= 1
    return out & ~g


def corruptions(rng: np.random.Generator, g: np.ndarray, num_cuts: int, num_bridges: int) -> dict[str, np.ndarray]:
    """Hard corrupted masks of ``g`` (float32) and the soft prediction with its desired push direction ``D``."""
    cut = cuts(rng, g, num_cuts)
    bridge = bridges(rng, g, num_bridges) if g.ndim == 2 else bridges_between(rng, g, num_bridges)
    n_cut, n_bridge = max(int(cut.sum()), 1), max(int(bridge.sum()), 1)
    out = {
        "label": g,
        "cut": g & ~cut,
        "bridge": g | bridge,
        "cut_thin": g & ~harmless(rng, g, n_cut, "thin"),
        "cut_thick": g | harmless(rng, g, n_cut, "thick"),
        "bridge_thin": g & ~harmless(rng, g, n_bridge, "thin"),
        "bridge_thick": g | harmless(rng, g, n_bridge, "thick"),
    }
    out = {k: v.astype(np.float32) for k, v in out.items()}
    out["n_cut"], out["n_bridge"] = np.float32(n_cut), np.float32(n_bridge)
    out["has_cut"], out["has_bridge"] = np.bool_(cut.any()), np.bool_(bridge.any())
    # The soft imperfect prediction: random harmless noise, the cuts (partly filled) and the bridges (partly
    # faded), blurred and rescaled to [lo, hi].
    noisy = g & ~harmless(rng, g, int(rng.integers(0, 2 * n_cut)), "thin")
    noisy |= harmless(rng, g, int(rng.integers(0, 2 * n_cut)), "thick")
    x = noisy.astype(np.float32)
    x[cut] = rng.uniform(0.0, 0.35)
    x[bridge] = rng.uniform(0.7, 1.0)
    x = ndimage.gaussian_filter(x, rng.uniform(0.5, 1.5))
    # a sparse 3D tree: a background offset over the whole volume would outweigh everything else
    lo, hi = rng.uniform(0.0, 0.15 if g.ndim == 2 else 0.03), rng.uniform(0.8, 1.0)
    out["soft"] = np.clip(lo + (hi - lo) * x, 0.0, 1.0).astype(np.float32)
    out["push"] = cut.astype(np.float32) - bridge.astype(np.float32)
    out["noise"] = (noisy ^ g).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------- training


def make_batch(rng: np.random.Generator, sources: list[np.ndarray], batch: int, size: int, counts) -> dict:
    samples = []
    for i in range(batch):
        g = random_crop(rng, sources[i % len(sources)], size)
        samples.append(corruptions(rng, g, int(rng.integers(*counts[0])), int(rng.integers(*counts[1]))))
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])).unsqueeze(1) for k in samples[0]}


def objective(
    net: MaskFeatures,
    b: dict,
    *,
    selectivity_weight: float = 0.0,
    margin: float = MARGIN,
    align_weight: float = ALIGN_WEIGHT,
) -> tuple[torch.Tensor, dict[str, float]]:
    hard = ("cut", "bridge", "cut_thin", "cut_thick", "bridge_thin", "bridge_thick")
    n = b["label"].shape[0]
    d = feature_distance(
        net, torch.cat([b[k] for k in hard]), b["label"].repeat(len(hard), 1, *[1] * (b["label"].ndim - 2))
    )
    d = dict(zip(hard, d.clamp_min(1e-12).view(len(hard), n)))
    count = {k: b["n_cut"].flatten() if k.startswith("cut") else b["n_bridge"].flatten() for k in hard}
    per_pixel = {k: d[k] / count[k] for k in hard}
    # a crop without a cut (or a bridge) has nothing to rank
    valid = {"cut": b["has_cut"].flatten(), "bridge": b["has_bridge"].flatten()}
    ratios = [
        torch.log(per_pixel[topo] / per_pixel[f"{topo}_{kind}"])[valid[topo]]
        for topo in ("cut", "bridge")
        for kind in ("thin", "thick")
    ]
    rank = torch.cat([F.softplus(math.log(margin) - r) for r in ratios]).mean()

    soft = b["soft"].clone().requires_grad_(True)
    term = feature_distance(net, soft, b["label"]).sum()
    (grad,) = torch.autograd.grad(term, soft, create_graph=True)
    push = b["push"].flatten(1)
    cos = (-grad.flatten(1) * push).sum(1) / (grad.flatten(1).norm(dim=1) * push.norm(dim=1) + 1e-12)
    align = (1 - cos).mean()
    # selectivity: the gradient on a cut pixel must be SELECTIVITY x that on a pixel of harmless border noise
    cut, noise = b["push"].flatten(1).clamp_min(0), b["noise"].flatten(1)
    magnitude = grad.flatten(1).abs()
    on_cut = (magnitude * cut).sum(1) / cut.sum(1).clamp_min(1)
    on_noise = (magnitude * noise).sum(1) / noise.sum(1).clamp_min(1)
    has_both = (cut.sum(1) > 0) & (noise.sum(1) > 0)
    log_sel = torch.log(on_cut.clamp_min(1e-30) / on_noise.clamp_min(1e-30))[has_both]
    select = F.softplus(math.log(SELECTIVITY) - log_sel).mean() if has_both.any() else grad.new_zeros(())
    stats = {
        "rank": rank.item(),
        "align": align.item(),
        "cos": cos.mean().item(),
        "cut_x": torch.cat([*ratios[:2], torch.tensor([torch.nan])]).exp().nanmedian().item(),
        "bridge_x": torch.cat([*ratios[2:], torch.tensor([torch.nan])]).exp().nanmedian().item(),
        "soft_d": term.item() / n,
        "sel_x": log_sel.exp().median().item() if has_both.any() else float("nan"),
    }
    # The ranking and the cosine ignore the feature scale; keep the term of a soft prediction near 1 so that the
    # scale does not drift (it did, to ~1e12, without this).
    scale = torch.log(term.detach().new_tensor(1.0) * term / n).square()
    loss = rank + align_weight * align + 0.01 * scale
    return (loss + selectivity_weight * select if selectivity_weight else loss), stats


def train(
    dims: int,
    steps: int,
    seed: int,
    isbi: Path,
    batch: int | None = None,
    log_every: int = 50,
    selectivity_weight: float = 0.0,
    margin: float = MARGIN,
    align_weight: float = ALIGN_WEIGHT,
) -> MaskFeatures:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if dims == 2:
        sources = [isbi_membranes(isbi), membrane_2d(16, 256, seed=seed)[1][:, 0].astype(bool)]
        size, counts, default_batch = 128, ((3, 11), (1, 5)), 8
    else:
        sources = [vessels_3d(8, 64, seed=seed, organ=False)[1][:, 0] == VESSEL]
        size, counts, default_batch = 32, ((2, 5), (1, 3)), 4
    batch = default_batch if batch is None else batch
    net = MaskFeatures(dims, weights=None, seed=seed)
    net.convs.requires_grad_(True)
    # The weight of each output map is learnt too (in log space); the objective chooses the scales that matter.
    log_scale = torch.zeros(net.num_maps, requires_grad=True)
    opt = torch.optim.Adam([*net.convs.parameters(), log_scale], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    t0 = time.perf_counter()
    soft_d = []
    for step in range(1, steps + 1):
        net.scale = log_scale.exp()
        b = make_batch(rng, sources, batch, size, counts)
        loss, stats = objective(net, b, selectivity_weight=selectivity_weight, margin=margin, align_weight=align_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # unit-gain filters (He scale): the objective ignores their norm, so fix it
            for m in net.convs:
                norm = m.weight.flatten(1).norm(dim=1).view(-1, *[1] * (m.weight.ndim - 1))
                m.weight.mul_(math.sqrt(2.0) / norm.clamp_min(1e-12))
        soft_d.append(stats["soft_d"])
        if step % log_every == 0 or step == steps:
            line = " ".join(f"{k} {v:.3g}" for k, v in stats.items())
            print(f"step {step:5d}  {time.perf_counter() - t0:6.0f}s  {line}", flush=True)
    net.requires_grad_(False)
    # Output scale: the term of a soft prediction is ~1 (the last quarter of training as the sample).
    with torch.no_grad():
        calibration = 1.0 / math.sqrt(max(float(np.mean(soft_d[-max(1, steps // 4) :])), 1e-12))
        net.scale = log_scale.detach().exp() * calibration
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--steps", type=int, default=None, help="default 700 (2D), 300 (3D)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isbi", type=Path, default=DEFAULT_ISBI, help="ISBI 2012 folder (only labels 00-23 read)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--selectivity-weight", type=float, default=0.0, help="weight of the gradient-selectivity term (0: off)"
    )
    parser.add_argument("--margin", type=float, default=MARGIN, help="wanted topological / harmless cost ratio")
    parser.add_argument(
        "--align-weight", type=float, default=ALIGN_WEIGHT, help="weight of the gradient direction term"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (700 if args.dims == 2 else 300)
    net = train(
        args.dims,
        steps,
        args.seed,
        args.isbi,
        selectivity_weight=args.selectivity_weight,
        margin=args.margin,
        align_weight=args.align_weight,
    )
    torch.save(net.state_dict(), args.out)
    print(f"saved {args.out}  sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
