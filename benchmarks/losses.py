"""Speed and peak memory of segloss losses beside MONAI's and ``torch.nn.functional.cross_entropy``.

Every (loss, implementation, case) runs in a fresh subprocess, so peak memory is not polluted by earlier cases:
on CUDA it is ``torch.cuda.max_memory_allocated``, on CPU the rise of the process's peak RSS (``ru_maxrss``) over
the RSS after the inputs were made, taken on the first step. Time is the median of ``--repeats`` forward+backward
passes after warm-up, with a fixed thread count; each worker runs ``--rounds`` times, interleaved with the other
implementations of the case, and the table gives the median over rounds. Targets are integer label maps
``(B,1,*)`` (MONAI with ``to_onehot_y=True``).

On the CPU, glibc hands large blocks back to the OS when they are freed, so every step page-faults its buffers
in again; that cost varied the time of one loss by up to 2x between processes here. After the memory step the
CPU worker therefore tells glibc to keep freed memory (``mallopt``), the CPU counterpart of CUDA's caching
allocator, which every GPU run has. ``--system-malloc`` keeps glibc's defaults.

    python benchmarks/losses.py                      # all losses, all cases, markdown table on stdout
    python benchmarks/losses.py --cases 1x14x96^3 --losses dice focal --repeats 3
    python benchmarks/losses.py --plain ...          # also time segloss's plain autograd paths (SEGLOSS_FUSED=0)
    python benchmarks/losses.py --paired 40 --cases 8x4x256^2 --losses dice generalized_dice

``--paired N`` answers one question more precisely than rounds of separate processes: the segloss/MONAI time
ratio. One process per (loss, case) holds both losses on the same inputs and times N pairs of steps back to back,
alternating which goes first; the table gives the median and quartiles of the N per-pair ratios. A slow phase of
a shared machine then hits both halves of a pair alike (separate processes scattered by +-30 % here).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    "8x4x256^2": (8, 4, (256, 256)),
    "2x4x96^3": (2, 4, (96, 96, 96)),
    "1x14x96^3": (1, 14, (96, 96, 96)),
    "1x32x128^3": (1, 32, (128, 128, 128)),
}

# name -> (segloss constructor source, MONAI constructor source or None); evaluated in the worker.
ONEHOT = "to_onehot_y=True, softmax=True"
LOSSES = {
    "cross_entropy": ("segloss.WeightedCrossEntropyLoss()", None),
    "focal": (
        "segloss.FocalLoss(to_onehot_y=True, use_softmax=True)",
        "monai.losses.FocalLoss(to_onehot_y=True, use_softmax=True)",
    ),
    "dice": (f"segloss.DiceLoss({ONEHOT})", f"monai.losses.DiceLoss({ONEHOT})"),
    "generalized_dice": (f"segloss.GeneralizedDiceLoss({ONEHOT})", f"monai.losses.GeneralizedDiceLoss({ONEHOT})"),
    "tversky": (f"segloss.TverskyLoss({ONEHOT})", f"monai.losses.TverskyLoss({ONEHOT})"),
    "focal_tversky": (f"segloss.FocalTverskyLoss({ONEHOT})", None),
    "dice_ce": (f"segloss.DiceCELoss({ONEHOT})", f"monai.losses.DiceCELoss({ONEHOT})"),
    "dice_focal": (f"segloss.DiceFocalLoss({ONEHOT})", f"monai.losses.DiceFocalLoss({ONEHOT})"),
}
BASELINE = "F.cross_entropy"
MEMORY_REFERENCE = ("dice_ce", "monai")
# Lovász losses: implementation -> callable source, evaluated in the worker (``_lovasz_fn``) after the inputs are made.
# All compute the same loss, per image over all classes (kornia's convention): segloss's batched sort, the textbook
# per-image/per-class loop of ``lovasz_reference.py`` (float32), kornia fed the volume reshaped to 2D (same loss),
# ``sort``: the time of segloss's sort of the B*C int32 key rows alone (forward only), and ``binned``: segloss's opt-in
# approximation (``tolerance=1e-3``: within 1e-3 of the exact loss, no sort).
LOVASZ = {
    "lovasz_softmax": {
        "segloss": "segloss.LovaszSoftmaxLoss(per_image=True, classes='all')",
        "binned": "segloss.LovaszSoftmaxLoss(per_image=True, classes='all', tolerance=1e-3)",
        "loop": "lambda x, y: lovasz_reference.lovasz_softmax_loop(x.softmax(1), onehot, valid[:, 0], "
        "classes='all', per_image=True)",
        "kornia": "lambda x, y: kornia.losses.lovasz_softmax_loss(x.reshape(B, C, -1, W), y.reshape(B, -1, W))",
        "sort": "sort",
    },
    "lovasz_hinge": {
        "segloss": "segloss.LovaszHingeLoss(per_image=True)",
        "binned": "segloss.LovaszHingeLoss(per_image=True, tolerance=1e-3)",
        "loop": "lambda x, y: lovasz_reference.lovasz_hinge_loop(x, onehot, valid, per_image=True)",
        "kornia": "lambda x, y: kornia.losses.lovasz_hinge_loss(x.reshape(B * C, 1, -1, W), "
        "onehot.reshape(B * C, -1, W))",
        "sort": "sort",
    },
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _lovasz_fn(loss_name: str, impl: str, logits, label):
    """The loss callable of a Lovász entry (see ``LOVASZ``); ``sort`` times the key sort alone."""
    import kornia  # noqa: F401
    import lovasz_reference  # noqa: F401  (beside this script)
    import torch
    import torch.nn.functional as F

    import segloss  # noqa: F401

    B, C, W = logits.shape[0], logits.shape[1], logits.shape[-1]  # noqa: F841  (used by the sources)
    onehot = F.one_hot(label[:, 0], C).movedim(-1, 1).float()  # noqa: F841  (used by the sources)
    valid = torch.ones_like(onehot, dtype=torch.bool)  # noqa: F841
    if impl == "sort":
        keys = torch.rand(B * C, logits[0, 0].numel(), device=logits.device).view(torch.int32)
        return lambda x, y: torch.sort(keys, dim=-1, stable=True).indices  # the sort of _LovaszExtension
    return eval(LOVASZ[loss_name][impl], {**globals(), **locals()})  # the lambdas see the inputs above


def _keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and never trim it, so later steps reuse memory."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def _inputs(case: str, device: str):
    import torch

    B, C, spatial = CASES[case]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, *spatial, generator=g).to(device).requires_grad_(True)
    label = torch.randint(0, C, (B, 1, *spatial), generator=g).to(device)
    return logits, label


def _step(loss_fn, logits, label, device: str):
    """One timed forward+backward of ``loss_fn`` on the case's inputs."""
    import torch

    def step():
        logits.grad = None
        out = loss_fn(logits, label)
        if out.requires_grad:  # the "sort alone" entry has no backward
            out.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def paired_worker(
    loss_name: str, case: str, pairs: int, threads: int, device: str, keep_freed: bool = False, checks: bool = True
) -> dict:
    """Median and quartiles of ``pairs`` segloss/MONAI step-time ratios, timed back to back in one process;
    ``checks=False`` times segloss with its data-dependent input checks off (MONAI has none)."""
    import monai  # noqa: F401
    import torch

    import segloss  # noqa: F401

    torch.set_num_threads(threads)
    segloss.losses.set_input_checks(checks)
    logits, label = _inputs(case, device)
    segloss_fn, monai_fn = eval(LOSSES[loss_name][0]), eval(LOSSES[loss_name][1])
    steps = [_step(fn, logits, label, device) for fn in (segloss_fn, monai_fn)]
    for step in steps:
        step()
    if keep_freed:
        _keep_freed_memory()
    for step in steps * 2:
        step()
    ratios = []
    for i in range(pairs):
        ms = {}
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            steps[k]()
            ms[k] = time.perf_counter() - t0
        ratios.append(ms[0] / ms[1])
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return {"ratio": median, "q1": q1, "q3": q3, "pairs": pairs}


def worker(
    loss_name: str, impl: str, case: str, repeats: int, threads: int, device: str, keep_freed: bool = False
) -> dict:
    import monai  # noqa: F401
    import torch
    import torch.nn.functional as F  # noqa: F401

    import segloss  # noqa: F401

    torch.set_num_threads(threads)
    if impl == "torch":
        loss_fn = lambda x, y: F.cross_entropy(x, y[:, 0])  # noqa: E731
    elif loss_name not in LOVASZ:
        if impl == "plain":  # segloss with its fused autograd Functions switched off: the plain autograd path
            segloss.losses.set_fused_paths(False)
        source = LOSSES[loss_name][0 if impl in ("segloss", "plain") else 1]
        loss_fn = eval(source)
    logits, label = _inputs(case, device)
    if loss_name in LOVASZ:
        loss_fn = _lovasz_fn(loss_name, impl, logits, label)
    step = _step(loss_fn, logits, label, device)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    step()  # warm-up (and the memory peak)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        if keep_freed:
            keep_freed = _keep_freed_memory()
    step()
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times), "peak_mb": peak, "kept_freed": keep_freed}


def run_case(loss_name, impl, case, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", loss_name, impl, case]
    cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
    if args.system_malloc:
        cmd.append("--system-malloc")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_rounds(entries, case, args) -> dict:
    """Run every (loss, impl) entry of one case ``args.rounds`` times, round-robin, so slow phases of a shared
    machine hit all implementations alike. ms: median over rounds; peak MB: the first round's."""
    runs = {entry: [] for entry in entries}
    for _ in range(args.rounds):
        for entry in entries:
            runs[entry].append(run_case(*entry, case, args))
    results = {}
    for (name, impl), outs in runs.items():
        good = [o for o in outs if "error" not in o]
        if not good:
            results[(name, impl, case)] = outs[0]
            continue
        ms = [o["ms"] for o in good]
        results[(name, impl, case)] = {"ms": statistics.median(ms), "peak_mb": good[0]["peak_mb"], "rounds_ms": ms}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--losses", nargs="*", default=[*LOSSES, *LOVASZ], choices=[*LOSSES, *LOVASZ])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="subprocess runs per entry, interleaved")
    parser.add_argument("--system-malloc", action="store_true", help="time with glibc's default (trimming) malloc")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument(
        "--plain", action="store_true", help="also time segloss with its fused paths off (set_fused_paths(False))"
    )
    parser.add_argument("--paired", type=int, metavar="N", help="only the segloss/MONAI ratio, from N paired steps")
    parser.add_argument(
        "--no-input-checks", action="store_true", help="with --paired: segloss with set_input_checks(False)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("LOSS", "IMPL", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--paired-worker", nargs=2, metavar=("LOSS", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paired_worker:
        keep_freed = args.device == "cpu" and not args.system_malloc
        checks = not args.no_input_checks
        print(
            json.dumps(paired_worker(*args.paired_worker, args.paired, args.threads, args.device, keep_freed, checks))
        )
        return
    if args.paired:
        print(
            f"threads={args.threads} device={args.device}: segloss/MONAI time, {args.paired} paired steps, "
            f"segloss input checks {'off' if args.no_input_checks else 'on'}\n"
        )
        print("| case | loss | segloss/MONAI median | quartiles |")
        print("|---|---|---|---|")
        for case in args.cases:
            for name in (n for n in args.losses if n in LOSSES and LOSSES[n][1] is not None):
                cmd = [sys.executable, __file__, "--paired-worker", name, case, "--paired", str(args.paired)]
                out = subprocess.run(
                    cmd
                    + ["--threads", str(args.threads), "--device", args.device]
                    + ["--system-malloc"] * args.system_malloc
                    + ["--no-input-checks"] * args.no_input_checks,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {case} | {name} | {r['ratio']:.2f} | {r['q1']:.2f}-{r['q3']:.2f} |", flush=True)
        return
    if args.worker:
        keep_freed = args.device == "cpu" and not args.system_malloc
        print(json.dumps(worker(*args.worker, args.repeats, args.threads, args.device, keep_freed)))
        return

    results = {}
    for case in args.cases:
        entries = [("cross_entropy", "torch"), MEMORY_REFERENCE]
        for name in args.losses:
            for impl in LOVASZ[name] if name in LOVASZ else ("segloss", "monai", "plain")[: 2 + args.plain]:
                if (impl != "monai" or LOSSES[name][1] is not None) and (name, impl) not in entries:
                    entries.append((name, impl))
        for (name, impl, c), out in run_rounds(entries, case, args).items():
            results[(BASELINE if impl == "torch" else name, impl, c)] = out
        print(f"done {case}", file=sys.stderr, flush=True)

    malloc = "glibc default" if args.system_malloc or args.device != "cpu" else "freed memory kept (mallopt)"
    print(
        f"threads={args.threads} device={args.device} repeats={args.repeats} rounds={args.rounds} malloc: {malloc} "
        "(ms: median over rounds of the median forward+backward; peak MB above the inputs, first step)\n"
    )
    print(
        "| case | loss | segloss ms | MONAI ms | segloss/MONAI | segloss/CE | segloss MB | MONAI MB "
        "| segloss MB / MONAI DiceCE MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        ce = results[(BASELINE, "torch", case)]
        ref_mem = results[(*MEMORY_REFERENCE, case)]
        print(
            f"| {case} | F.cross_entropy | {ce.get('ms', float('nan')):.1f} | | | 1.00 | {ce.get('peak_mb', 0):.0f} | | |"
        )
        for name in args.losses:
            s = results[(name, "segloss", case)]
            m = results.get((name, "monai", case), {})
            if "error" in s:
                print(f"| {case} | {name} | error: {s['error']} | | | | | | |")
                continue
            cells = [f"{s['ms']:.1f}", f"{m['ms']:.1f}" if "ms" in m else "-"]
            cells.append(f"{s['ms'] / m['ms']:.2f}" if "ms" in m else "-")
            cells.append(f"{s['ms'] / ce['ms']:.2f}" if "ms" in ce else "-")
            cells += [f"{s['peak_mb']:.0f}", f"{m['peak_mb']:.0f}" if "peak_mb" in m else "-"]
            cells.append(f"{s['peak_mb'] / ref_mem['peak_mb']:.2f}" if "peak_mb" in ref_mem else "-")
            print(f"| {case} | {name} | " + " | ".join(cells) + " |")
    if args.plain:
        print("\nFused paths against the plain autograd path of the same formula (same run)\n")
        print("| case | loss | fused ms | plain ms | fused/plain | fused MB | plain MB |")
        print("|---|---|---|---|---|---|---|")
        for case in args.cases:
            for name in (n for n in args.losses if n in LOSSES):
                f, p = results[(name, "segloss", case)], results[(name, "plain", case)]
                if "ms" in f and "ms" in p:
                    cells = [f"{f['ms']:.1f}", f"{p['ms']:.1f}", f"{f['ms'] / p['ms']:.2f}"]
                    cells += [f"{f['peak_mb']:.0f}", f"{p['peak_mb']:.0f}"]
                    print(f"| {case} | {name} | " + " | ".join(cells) + " |")
    lovasz = [name for name in args.losses if name in LOVASZ]
    if lovasz:
        print("\nLovász losses, per image over all classes (ms of forward+backward; sort: forward only)\n")
        print(
            "| case | loss | segloss ms | binned ms | loop ms | kornia ms | sort alone ms | segloss/loop | segloss/kornia "
            "| binned/kornia | segloss/CE |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for case in args.cases:
            ce = results[(BASELINE, "torch", case)].get("ms")
            for name in lovasz:
                ms = {impl: results[(name, impl, case)].get("ms") for impl in LOVASZ[name]}
                cells = [f"{v:.1f}" if v else "error" for v in ms.values()]
                s = ms["segloss"]
                cells += [f"{s / ms[k]:.2f}" if s and ms[k] else "-" for k in ("loop", "kornia")]
                b, k = ms["binned"], ms["kornia"]
                cells.append(f"{b / k:.2f}" if b and k else "-")
                cells.append(f"{s / ce:.2f}" if s and ce else "-")
                print(f"| {case} | {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"|".join(k): v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
