"""3D loss study: do skeleton recall and the topology term keep synthetic vessel trees connected?

The 3D sibling of ``loss_study.py``. It trains the CT bundle's network (``network_def`` of
``bundles/ct_spleen_3d/configs/train.json``, a 5-level 3D UNet) once per (loss, seed) on synthetic CT-like
volumes with a branching vessel tree of known topology (:func:`segloss.data.synthetic.vessels_3d`, 96^3, no
organ: vessel against background), and scores the last model on whole held-out volumes: vessel Dice, clDice
(Lee 3D skeleton) and the Betti-0 / Betti-1 / Betti-2 errors (26-connected vessels), averaged over volumes.

Volumes: training = ``vessels_3d(16, 96, seed=0)``, validation = ``vessels_3d(6, 96, seed=1000)``; intensities
through the bundle's HU window. Patches of 48^3, half of them centred on a vessel voxel (the bundle's
``RandCropByPosNegLabeld`` pos/neg = 1/1), random flips. Runs are paired as in the 2D study: seed ``s`` gives
every loss the same initial weights and the same patches.

Each (loss, seed) runs in its own subprocess and writes ``<results>/rows/<loss>_s<seed>.json`` atomically; a
finished run is never trained again. The CSV, the table (written into ``docs/loss_study.md`` between
``<!-- table:3d_cpu -->`` markers for the ``cpu`` budget) and the figures are rebuilt from those files.

    python benchmarks/loss_study_3d.py --budget cpu --workers 2   # train what is missing, then report
    python benchmarks/loss_study_3d.py --budget cpu --report      # tables and figures only
    python benchmarks/loss_study_3d.py --budget cpu --timing      # step time of every loss vs CE, one process
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_study  # noqa: E402  (the 2D study: runner, CSV, table and atomic writes are shared)

REPO = loss_study.REPO
BUNDLE_CONFIG = REPO / "bundles" / "ct_spleen_3d" / "configs" / "train.json"
PUBLISHED = ("cpu",)
BUDGETS = {
    # steps, patch edge, patches per step, Adam learning rate (cosine to 0), evaluations on the way, seeds, volumes
    "cpu": {
        "steps": 1200,
        "patch": 48,
        "batch": 2,
        "lr": 1e-3,
        "evals": 4,
        "seeds": [0, 1, 2],
        "threads": 1,
        "train": 16,
        "val": 6,
        "size": 96,
    },
    # for the tests
    "tiny": {
        "steps": 3,
        "patch": 32,
        "batch": 1,
        "lr": 1e-3,
        "evals": 1,
        "seeds": [0],
        "threads": 1,
        "train": 2,
        "val": 1,
        "size": 48,
    },
}
TOPOLOGY_MU = 0.1  # the weight of the topology term in the 2D study and TopologyAwareLoss's default


# ---------------------------------------------------------------------------------------------------- losses


def _dice_ce():
    """The CT bundle's ``dice_ce`` option."""
    import segloss

    return segloss.DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)


def _with_topology(extractor: str):
    """DiceCE + 0.1 x the topology term: ``"slices"`` = 2D MaskFeatures on 8 slices per axis, ``"volume"`` = the
    native 3D MaskFeatures (what ``weights="auto"`` picks offline), ``"vgg_random"`` = random VGG-19 on slices."""
    import segloss
    from segloss.networks import MaskFeatures

    if extractor == "slices":
        term = segloss.TopologyLoss(softmax=True, to_onehot_y=True, feature_extractor=MaskFeatures(2), generator=0)
    else:
        term = segloss.TopologyLoss(
            softmax=True, to_onehot_y=True, weights="auto" if extractor == "volume" else None, generator=0
        )
    return segloss.TopologyAwareLoss(_dice_ce(), mu=TOPOLOGY_MU, topology_loss=term)


class SoftclDice(nn.Module):
    """DiceCE + MONAI's ``SoftclDiceLoss`` (the peer's topology term), one weight each."""

    def __init__(self) -> None:
        super().__init__()
        import monai.losses

        self.dice_ce = _dice_ce()
        self.cldice = monai.losses.SoftclDiceLoss(include_background=False, to_onehot_y=True, softmax=True)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_ce(input, target) + self.cldice(input, target.float())


def _skeleton_recall():
    import segloss

    return segloss.CompoundLoss(
        {"dice_ce": _dice_ce(), "skeleton_recall": segloss.SkeletonRecallLoss(to_onehot_y=True, softmax=True)},
        term_kwargs={"dice_ce": [], "skeleton_recall": ["skeleton"]},
    )


def _dice_ce_then_lovasz():
    """The CT bundle's default: DiceCE, plus Lovász-Softmax (weight 1) from half the budget on (``SCHEDULES``)."""
    import segloss

    lovasz = segloss.LovaszSoftmaxLoss(include_background=False, to_onehot_y=True, softmax=True)
    return segloss.CompoundLoss({"dice_ce": _dice_ce(), "lovasz": lovasz}, {"dice_ce": 1.0, "lovasz": 0.0})


# name -> (builder() -> loss module, the batch keys its forward takes)
LOSSES = {
    "ce": (lambda: __import__("segloss").WeightedCrossEntropyLoss(), []),
    "dice": (
        lambda: __import__("segloss").DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True),
        [],
    ),
    "dice_ce": (_dice_ce, []),
    "dice_ce_skeleton_recall": (_skeleton_recall, ["skeleton"]),
    "dice_ce_soft_cldice": (SoftclDice, []),
    "dice_ce_then_lovasz": (_dice_ce_then_lovasz, []),
    "dice_ce_topology_slices": (lambda: _with_topology("slices"), []),
    "dice_ce_topology_volume": (lambda: _with_topology("volume"), []),
    "dice_ce_vgg_random_slices": (lambda: _with_topology("vgg_random"), []),
}
# name -> the term-weight points of a loss whose weights change during training, for ``steps`` steps
SCHEDULES = {"dice_ce_then_lovasz": lambda steps: {"lovasz": [(0, 0.0), (steps // 2, 1.0)]}}
ORDER = list(LOSSES)  # cheap, decisive comparisons first, the expensive VGG term last
COLUMNS = {
    "dice": "Dice",
    "cldice": "clDice",
    "betti0": "Betti-0 err",
    "betti1": "Betti-1 err",
    "betti2": "Betti-2 err",
    "betti": "Betti err",
}
METRICS = [*COLUMNS, "step_s", "peak_mb"]


# ---------------------------------------------------------------------------------------------------- data


def volumes(cfg: dict, cache: Path) -> dict[str, np.ndarray]:
    """Training and validation images in [0, 1] through the bundle's HU window, vessel masks and tubed
    skeletons of the training masks, ``(N, X, Y, Z)``; generated once and cached on disk."""
    from segloss.data.synthetic import vessels_3d
    from segloss.transforms.array import label_skeleton

    key = cache / f"vessels_{cfg['train']}_{cfg['val']}_{cfg['size']}.npz"
    if key.is_file():
        with np.load(key) as z:
            return dict(z)
    lo, hi = json.loads(BUNDLE_CONFIG.read_text())["hu_window"]
    out = {}
    for part, num, seed in (("train", cfg["train"], 0), ("val", cfg["val"], 1000)):
        hu, lab = vessels_3d(num, cfg["size"], seed=seed, organ=False)
        out[f"{part}_image"] = np.clip((hu[:, 0].astype(np.float32) - lo) / (hi - lo), 0, 1)
        out[f"{part}_label"] = lab[:, 0]
    out["train_skeleton"] = np.stack([label_skeleton(m, dilation=1) for m in out["train_label"]])
    cache.mkdir(parents=True, exist_ok=True)
    tmp = key.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **out)
    tmp.replace(key)
    return out


class PatchSampler:
    """Random 3D patches, half centred on a vessel voxel, with random flips; fixed by the seed."""

    def __init__(self, image, label, skeleton, patch: int, batch: int, seed: int) -> None:
        self.arrays = np.stack([image, label, skeleton], axis=1).astype(np.float32)  # (N, 3, X, Y, Z)
        self.vessel = [np.argwhere(m > 0) for m in label]
        self.patch, self.batch = patch, batch
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> dict[str, torch.Tensor]:
        n, p = len(self.arrays), self.patch
        size = np.array(self.arrays.shape[2:])
        out = []
        for k in range(self.batch):
            i = self.rng.integers(n)
            if k % 2 == 0 and len(self.vessel[i]):
                centre = self.vessel[i][self.rng.integers(len(self.vessel[i]))]
                corner = np.clip(centre - p // 2, 0, size - p)
            else:
                corner = np.array([self.rng.integers(s - p + 1) for s in size])
            a = self.arrays[i, :, corner[0] : corner[0] + p, corner[1] : corner[1] + p, corner[2] : corner[2] + p]
            for axis in (1, 2, 3):
                if self.rng.random() < 0.5:
                    a = np.flip(a, axis)
            out.append(a.copy())
        b = torch.from_numpy(np.stack(out))
        return {"image": b[:, 0:1], "label": b[:, 1:2].long(), "skeleton": b[:, 2:3].long()}


# ---------------------------------------------------------------------------------------------------- model


def bundle_network() -> nn.Module:
    """The CT bundle's network with one vessel class: its ``network_def``, ``out_channels`` 2."""
    from monai.networks.nets import UNet

    net_def = dict(json.loads(BUNDLE_CONFIG.read_text())["network_def"])
    if net_def.pop("_target_") != "UNet":
        raise ValueError("the study builds the bundle's MONAI UNet; the bundle's network_def names another network.")
    return UNet(**{**net_def, "out_channels": 2})


@torch.no_grad()
def evaluate(net: nn.Module, images: np.ndarray, labels: np.ndarray, device) -> tuple[dict, np.ndarray]:
    """Mean metrics over whole volumes and the predicted vessel masks ``(N, X, Y, Z)`` bool."""
    from segloss.metrics import betti_number_error, cldice

    net.eval()
    preds = [(net(torch.from_numpy(img)[None, None].to(device)).argmax(1)[0] == 1).cpu().numpy() for img in images]
    net.train()
    rows = []
    for pred, lab in zip(preds, labels.astype(bool)):
        b0, b1, b2 = betti_number_error(pred, lab)
        dice = 2 * np.count_nonzero(pred & lab) / max(np.count_nonzero(pred) + np.count_nonzero(lab), 1)
        rows.append([dice, cldice(pred, lab), b0, b1, b2, b0 + b1 + b2])
    mean = np.mean(np.array(rows, dtype=np.float64), axis=0)
    return dict(zip(COLUMNS, map(float, mean))), np.stack(preds)


# ---------------------------------------------------------------------------------------------------- one run


def train_one(loss_name: str, seed: int, budget: str, results: Path) -> dict:
    """Train one (loss, seed), write its JSON and the first validation volume's prediction; return the row."""
    cfg = BUDGETS[budget]
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = volumes(cfg, results / "cache")
    build, keys = LOSSES[loss_name]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout

    torch.manual_seed(seed)
    net = bundle_network().to(device)
    loss_fn = build().to(device)
    schedule = SCHEDULES.get(loss_name)
    if schedule is not None:
        from segloss.losses import TermWeightSchedule

        schedule = TermWeightSchedule(schedule(cfg["steps"]), mode="step")
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["steps"])
    sampler = PatchSampler(
        data["train_image"], data["train_label"], data["train_skeleton"], cfg["patch"], cfg["batch"], seed
    )
    eval_at = {round(cfg["steps"] * (k + 1) / cfg["evals"]) for k in range(cfg["evals"])}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = loss_study._peak_mb(device) if device.type == "cpu" else 0.0
    step_s, curve, diverged = [], [], False
    start = time.perf_counter()
    for step in range(cfg["steps"]):
        batch = {k: v.to(device) for k, v in sampler().items()}
        if schedule is not None:
            schedule.apply(loss_fn, step)
        t0 = time.perf_counter()
        loss = loss_fn(net(batch["image"]), batch["label"], **{k: batch[k] for k in keys})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s.append(time.perf_counter() - t0)
        if not math.isfinite(loss.item()):
            diverged = True
            break
        if step + 1 in eval_at:
            metrics, _ = evaluate(net, data["val_image"], data["val_label"], device)
            curve.append({"step": step + 1, "loss": float(loss.item()), **metrics})
    metrics, preds = evaluate(net, data["val_image"], data["val_label"], device)
    row = {
        "loss": loss_name,
        "seed": seed,
        **metrics,
        "step_s": statistics.median(step_s),
        "peak_mb": loss_study._peak_mb(device) - base_mb,
        "train_s": time.perf_counter() - start,
        "budget": budget,
        "steps": len(step_s),
        "diverged": diverged,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": commit.strip(),
        "curve": curve,
    }
    pred_file = results / "predictions" / f"{loss_name}_s{seed}_volume0.npz"
    pred_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(pred_file, pred=preds[0])
    loss_study._write_atomic(results / "rows" / f"{loss_name}_s{seed}.json", json.dumps(row, indent=1))
    return row


def time_steps(budget: str, losses, repeats: int = 5, steps: int = 5) -> dict[str, float]:
    """Median seconds per training step of each loss, in one process, round-robin over ``repeats`` rounds."""
    cfg = BUDGETS[budget]
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = volumes(cfg, loss_study.RESULTS / f"loss_study_3d_{budget}" / "cache")
    batch = {
        k: v.to(device)
        for k, v in PatchSampler(
            data["train_image"], data["train_label"], data["train_skeleton"], cfg["patch"], cfg["batch"], 0
        )().items()
    }
    nets = {}
    for name in losses:
        torch.manual_seed(0)
        net = bundle_network().to(device)
        loss_fn = LOSSES[name][0]().to(device)
        for term in SCHEDULES.get(name, lambda steps: {})(1):  # a scheduled loss costs its most expensive phase
            loss_fn.set_weight(term, 1.0)
        nets[name] = (net, loss_fn, torch.optim.Adam(net.parameters(), 1e-3))

    def step(name):
        net, loss_fn, opt = nets[name]
        loss = loss_fn(net(batch["image"]), batch["label"], **{k: batch[k] for k in LOSSES[name][1]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in losses}
    for name in losses:
        step(name)  # warm-up
    for _ in range(repeats):
        for name in losses:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------- report


def plot(rows: list[dict], results: Path, figures: Path, cfg: dict) -> list[Path]:
    """Metric bars with seed spread, validation curves, and one projection per loss of validation volume 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    names = [n for n in ORDER if any(r["loss"] == n for r in rows)]
    metrics = ["betti0", "betti1", "dice", "cldice"]  # Betti-2 (cavities) is in the table
    out = [loss_study.metric_bars(rows, names, metrics, figures / f"{results.name}_metrics.png")]
    betti = "Betti error (b0 + b1 + b2) per volume"
    out.append(
        loss_study.validation_curves(rows, names, betti, "validation volumes", figures / f"{results.name}_curves.png")
    )

    label = volumes(cfg, results / "cache")["val_label"][0] > 0
    rows_any, cols_any = np.flatnonzero(label.any((1, 2))), np.flatnonzero(label.any((0, 2)))
    crop = (  # the tree's bounding box in the projection, with a margin: the tree fills a small part of the volume
        slice(max(rows_any[0] - 6, 0), rows_any[-1] + 7),
        slice(max(cols_any[0] - 6, 0), cols_any[-1] + 7),
    )
    cols = 4
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 4 * nrows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, name in zip(np.ravel(axes), names):
        file = results / "predictions" / f"{name}_s0_volume0.npz"
        if not file.is_file():
            continue
        with np.load(file) as z:
            pred = z["pred"]
        rgb = np.ones((*label.shape[:2], 3))  # projections along the axial axis
        found, missed, false = (pred & label).any(2), (label & ~pred).any(2), (pred & ~label).any(2)
        rgb[found] = (0.2, 0.2, 0.2)
        rgb[missed & ~found] = (0.9, 0.1, 0.1)
        rgb[false & ~found] = (0.1, 0.5, 0.9)
        ax.imshow(rgb[crop])
        r = next(r for r in rows if r["loss"] == name and r["seed"] == 0)
        ax.set_title(f"{name}\nBetti err {r['betti']:.1f}, Dice {r['dice']:.3f}", fontsize=9)
    fig.suptitle("validation volume 0, seed 0, axial projection: black found, red missed only, blue false only")
    fig.tight_layout()
    out.append(figures / f"{results.name}_projections.png")
    fig.savefig(out[-1], dpi=80)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/results/loss_study_3d_BUDGET")
    parser.add_argument("--losses", nargs="+", default=None, choices=ORDER)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only rebuild the CSV, tables and figures")
    parser.add_argument("--timing", action="store_true", help="measure step time of every loss vs CE, one process")
    parser.add_argument("--run", nargs=2, metavar=("LOSS", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--doc", type=Path, default=None, help="page to write the table into")
    parser.add_argument("--figures", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = BUDGETS[args.budget]
    results = args.results or loss_study.RESULTS / f"loss_study_3d_{args.budget}"
    published = args.budget in PUBLISHED
    doc = args.doc or (loss_study.DOC if published else results / "table.md")
    figures = args.figures or (loss_study.FIGURES if published else results)
    losses = args.losses or ORDER
    if args.run:
        train_one(args.run[0], int(args.run[1]), args.budget, results)
        return
    if args.timing:
        timing = time_steps(args.budget, losses)
        loss_study._write_atomic(results / "timing.json", json.dumps(timing, indent=1))
        for name, s in timing.items():
            print(f"{name:32s} {1000 * s:8.1f} ms  {s / timing.get('ce', s):.2f}x CE")
        return
    if not args.report:
        volumes(cfg, results / "cache")  # once, before the workers

        def worker_argv(name, seed):
            return [
                sys.executable,
                __file__,
                "--budget",
                args.budget,
                "--results",
                str(results),
                "--run",
                name,
                str(seed),
            ]

        todo = loss_study.pending(results, losses, args.seeds or cfg["seeds"])
        loss_study.run_all(todo, worker_argv, args.workers, results, cfg["threads"])
    rows = loss_study.read_runs(results, ORDER)
    if not rows:
        raise SystemExit(f"no finished runs in {results / 'rows'}")
    loss_study.write_csv(rows, results.parent / f"{results.name}.csv", METRICS)
    timing_file = results / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else None
    table = loss_study.summary_table(rows, timing, ORDER, COLUMNS)
    loss_study.write_doc_table(
        results.name.removeprefix("loss_study_"),
        table,
        f"python benchmarks/loss_study_3d.py --budget {args.budget}",
        doc,
    )
    print(table)
    print("figures:", *map(str, plot(rows, results, figures, cfg)))


if __name__ == "__main__":
    main()
