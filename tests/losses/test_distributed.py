"""sync_batch: 2 CPU ranks (gloo) give the loss and gradients of one process holding the whole batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import segloss

WORLD = 2
CASES = {
    "dice": lambda: segloss.DiceLoss(softmax=True, batch=True, sync_batch=True),
    "dice_nobg_weighted": lambda: segloss.DiceLoss(
        softmax=True, batch=True, sync_batch=True, include_background=False, weight=[1.0, 3.0]
    ),
    "generalized_dice": lambda: segloss.GeneralizedDiceLoss(softmax=True, batch=True, sync_batch=True),
    "tversky": lambda: segloss.TverskyLoss(softmax=True, batch=True, sync_batch=True, alpha=0.3, beta=0.7),
}


def _data():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 2, 8, 8, generator=g)
    # label 2 only in the second half of the batch: per-rank statistics differ from the global ones
    label = torch.randint(0, 2, (4, 1, 8, 8), generator=g)
    label[2:, :, :4] = 2
    return image, label


def _model():
    torch.manual_seed(1)
    return torch.nn.Conv2d(2, 3, 3, padding=1)


def _step(model, loss_fn, image, label):
    loss = loss_fn(model(image), label)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image, label = _data()
        shard = slice(rank * 2, rank * 2 + 2)
        results = {}
        for name, make in CASES.items():
            model = torch.nn.parallel.DistributedDataParallel(_model())
            results[name] = _step(model, make(), image[shard], label[shard])
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batch_equals_full_batch_on_one_process():
    image, label = _data()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for name, make in CASES.items():
        # reference: no process group, the whole batch in one process
        loss_ref, grads_ref = _step(_model(), make(), image, label)
        for r in range(WORLD):
            loss, grads = ranks[r][name]
            torch.testing.assert_close(loss, loss_ref, msg=f"{name}: loss on rank {r}")
            for g, g_ref in zip(grads, grads_ref):
                torch.testing.assert_close(g, g_ref, msg=f"{name}: DDP-averaged gradient on rank {r}")


def test_sync_batch_without_process_group_is_plain_batch_loss():
    image, label = _data()
    logits = _model()(image)
    a = segloss.DiceLoss(softmax=True, batch=True, sync_batch=True)(logits, label)
    b = segloss.DiceLoss(softmax=True, batch=True)(logits, label)
    torch.testing.assert_close(a, b)
