"""Cost of the topology-aware losses next to one training step of a MONAI UNet on the same batch.

First table: whole UNet training steps (2 softmax classes) with plain CE, border-weighted CE + Dice, and that plus
0.1 x the :class:`segloss.networks.MaskFeatures` topology term, as ratios to the plain CE step of the same run.

Second table: for each case (2D ``8x1x256^2``, 3D ``2x1x96^3``; binary, one sigmoid channel) it times
forward+backward of:

- ``unet step``: MONAI ``UNet(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))`` with BCE (the reference);
- ``TopologyLoss``: VGG-19 features up to conv3_4 (random weights: the cost does not depend on them), 3D with its
  default slice sampling;
- ``SkeletonRecallLoss`` (target: a precomputed tubed skeleton) and MONAI's ``SoftclDiceLoss`` (target: the
  segmentation; soft skeletons of both computed on the fly), on the same logits;
- ``skeletonize (CPU, per batch)``: the data-pipeline cost of Skeleton Recall's target (skimage skeletonize +
  one dilation per sample), not a training-step cost but shown for completeness.

Times are medians of ``--repeats`` runs after ``--warmup`` runs, with ``torch.set_num_threads(--threads)``.
GFLOP per sample: the TopologyLoss's forward conv FLOPs counted analytically from the layer shapes
(2 * C_in * C_out * 9 * H_l * W_l per conv, prediction and target), and ``torch.utils.flop_counter`` totals of
the whole forward+backward step for every row.

    python benchmarks/topology.py                 # markdown table on stdout
    python benchmarks/topology.py --cases 2d --repeats 3
    python benchmarks/topology.py --prior-only       # the MaskFeatures step-cost tables only (with 3D: the
                                                     # term's cost per voxel at 2 x 48^3, 64^3, 96^3)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import skeletonize
from torch.utils.flop_counter import FlopCounterMode

from segloss.losses import DiceCELoss, SkeletonRecallLoss, TopologyLoss
from segloss.networks import MaskFeatures

CASES = {"2d": (8, (256, 256)), "3d": (2, (96, 96, 96))}


def vgg_forward_gflop(features: torch.nn.Sequential, image_hw) -> float:
    """Analytic conv GFLOP of one forward pass of a (1, 1, H, W) image through ``features``."""
    (h, w), total = image_hw, 0
    for m in features:
        if isinstance(m, torch.nn.Conv2d):
            total += 2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * h * w
        elif isinstance(m, torch.nn.MaxPool2d):
            h, w = h // 2, w // 2
    return total / 1e9


def topology_gflop_per_sample(loss: TopologyLoss, spatial) -> float:
    """Forward conv GFLOP per sample and channel (prediction + target) of the slices the loss feeds VGG-19."""
    features = loss.feature_extractor.features
    if len(spatial) == 2:
        return 2 * vgg_forward_gflop(features, spatial)
    total = 0.0
    for axis in range(3):
        hw = [s for i, s in enumerate(spatial) if i != axis]
        k = spatial[axis] if loss.num_slices is None else min(loss.num_slices, spatial[axis])
        total += 2 * k * vgg_forward_gflop(features, hw)
    return total


def make_batch(batch: int, spatial, seed: int = 0):
    """Logits, a smooth binary segmentation of thin-ish structures, and its tubed skeleton (B, 1, *)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((batch, *spatial)), sigma=(0, *[3] * len(spatial)))
    seg = np.abs(field) < 0.15 * field.std()  # level-set bands: thin curved structures
    skel = np.stack([ndimage.binary_dilation(skeletonize(s)) & s for s in seg])
    to_t = lambda a: torch.from_numpy(a).float().unsqueeze(1)  # noqa: E731
    logits = torch.randn(batch, 1, *spatial, generator=torch.Generator().manual_seed(seed))
    return logits, to_t(seg), to_t(skel), seg


def timed(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def counted_gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def run_case(name: str, warmup: int, repeats: int) -> list[tuple[str, float, float, float | None]]:
    from monai.losses import SoftclDiceLoss
    from monai.networks.nets import UNet

    batch, spatial = CASES[name]
    logits, seg, skel, seg_np = make_batch(batch, spatial)
    torch.manual_seed(0)
    unet = UNet(len(spatial), 1, 1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    image = torch.randn_like(seg)
    topo = TopologyLoss(sigmoid=True, weights=None)
    srec = SkeletonRecallLoss(sigmoid=True)
    cldice = SoftclDiceLoss(sigmoid=True)
    leaf = logits.clone().requires_grad_(True)

    def unet_step():
        unet.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(unet(image), seg).backward()

    def loss_step(loss_fn, target):
        def step():
            leaf.grad = None
            loss_fn(leaf, target).backward()

        return step

    def skeletonize_batch():
        for s in seg_np:
            ndimage.binary_dilation(skeletonize(s))

    rows = []
    for label, fn, analytic in (
        ("unet step (BCE)", unet_step, None),
        ("TopologyLoss", loss_step(topo, seg), topology_gflop_per_sample(topo, spatial)),
        ("SkeletonRecallLoss", loss_step(srec, skel), None),
        ("monai SoftclDiceLoss", loss_step(cldice, seg), None),
    ):
        seconds = timed(fn, warmup, repeats)
        rows.append((label, seconds, counted_gflop(fn) / batch, analytic))
    rows.append(("skeletonize (CPU, per batch)", timed(skeletonize_batch, 0, max(1, repeats // 2)), 0.0, None))
    return rows


def prior_step_rows(name: str, warmup: int, repeats: int) -> list[tuple[str, float]]:
    """Whole training steps of a 2-class softmax UNet: plain CE, border-weighted CE + Dice, and that plus
    ``0.1 x`` the MaskFeatures topology term (2D: the 2D prior; 3D: the native 3D prior on the whole volume)."""
    from monai.networks.nets import UNet

    batch, spatial = CASES[name]
    _, seg, _, _ = make_batch(batch, spatial)
    label = seg.long()
    # A border weight map's values do not change the cost; precomputing it is data-pipeline work.
    weight_map = 1 + 9 * torch.rand(seg.shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    unet = UNet(len(spatial), 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    image = torch.randn_like(seg)
    dice_ce = DiceCELoss(softmax=True, to_onehot_y=True)
    # random MaskFeatures weights: the cost does not depend on them
    prior = TopologyLoss(softmax=True, to_onehot_y=True, feature_extractor=MaskFeatures(len(spatial), weights=None))

    def step(loss_fn):
        def run():
            unet.zero_grad(set_to_none=True)
            loss_fn(unet(image)).backward()

        return run

    steps = (
        ("plain CE", lambda out: F.cross_entropy(out, label[:, 0])),
        ("border-CE + Dice", lambda out: dice_ce(out, label, weight_map=weight_map)),
        (
            "border-CE + Dice + 0.1 MaskFeatures term",
            lambda out: dice_ce(out, label, weight_map=weight_map) + 0.1 * prior(out, label),
        ),
    )
    return [(label_, timed(step(fn), warmup, repeats)) for label_, fn in steps]


def prior_term_per_voxel(edges=(48, 64, 96), warmup: int = 1, repeats: int = 3) -> list[tuple[int, float]]:
    """Seconds per voxel of forward+backward of the 3D MaskFeatures term alone on ``2 x edge^3`` softmax logits:
    how its cost per voxel grows with the volume (its full-resolution maps stop fitting in the caches)."""
    prior = TopologyLoss(softmax=True, to_onehot_y=True, feature_extractor=MaskFeatures(3, weights=None))
    rows = []
    for edge in edges:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 2, edge, edge, edge, generator=g, requires_grad=True)
        label = torch.randint(0, 2, (2, 1, edge, edge, edge), generator=g)
        seconds = timed(lambda x=logits, t=label: prior(x, t).backward(), warmup, repeats)
        rows.append((edge, seconds / (2 * edge**3)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prior-only", action="store_true", help="only the MaskFeatures step-cost table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} after {args.warmup} warm-up\n")
    print("| case | UNet training step with | median ms | x plain CE step |")
    print("|---|---|---:|---:|")
    for name in args.cases:
        batch, spatial = CASES[name]
        case = f"{batch}x1x" + "x".join(map(str, spatial))
        rows = prior_step_rows(name, args.warmup, args.repeats)
        for label, seconds in rows:
            print(f"| {case} | {label} | {seconds * 1e3:.0f} | {seconds / rows[0][1]:.2f} |", flush=True)
    if "3d" in args.cases:
        print("\n| 3D MaskFeatures term alone, forward+backward | ns per voxel |")
        print("|---|---:|")
        for edge, seconds in prior_term_per_voxel(warmup=args.warmup, repeats=args.repeats):
            print(f"| 2x2x{edge}^3 logits | {seconds * 1e9:.0f} |", flush=True)
    if args.prior_only:
        return
    print()
    print(
        "| case | forward+backward of | median ms | x UNet step | conv/matmul GFLOP/sample (fwd+bwd, counted) "
        "| TopologyLoss fwd GFLOP/sample (analytic) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name in args.cases:
        batch, spatial = CASES[name]
        case = f"{batch}x1x" + "x".join(map(str, spatial))
        rows = run_case(name, args.warmup, args.repeats)
        unet_seconds = rows[0][1]
        for label, seconds, gflop, analytic in rows:
            ratio = seconds / unet_seconds
            counted = f"{gflop:.1f}" if gflop else "-"
            print(
                f"| {case} | {label} | {seconds * 1e3:.0f} | {ratio:.2f} | {counted} "
                f"| {'-' if analytic is None else f'{analytic:.1f}'} |"
            )


if __name__ == "__main__":
    main()
