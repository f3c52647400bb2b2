"""Fused nn.SyncBatchNorm with two CPU processes (gloo), uneven and empty per-process batches.

The reference is SyncBatchNorm's definition: BatchNorm over the union of every process's batch.
(nn.SyncBatchNorm itself refuses CPU tensors once it would synchronise, "SyncBatchNorm expected
input tensor to be on GPU", and its statistics kernels, torch.batch_norm_stats and friends, have
no CPU implementation, so it cannot be run here.) Each process runs the fused model on its own
slice of one global batch; the unfused model with plain BatchNorm2d (fp32, and float64) runs the
whole batch. Then, per process: its outputs are its slice of the reference outputs; its
gradients, summed over the processes, are the reference's (the loss is a sum over samples);
the running statistics and num_batches_tracked are the reference's, over two steps.
convert_sync_batchnorm before fuse_ and after it. The fp32 reference computes in the layout the
fused model does (channels_last from the stem on: conftest.plain_twin)."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import plain_twin
from fused_resnet.verify import compare, normwise_error

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(name):
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model


def _steps(model, batches, weights):
    """Two training steps, loss sum(out * weights) each; the outputs and gradients of each."""
    results = []
    for x, w in zip(batches, weights):
        model.zero_grad()
        dtype = next(model.parameters()).dtype
        out = model(x.to(dtype))
        (out * w.to(dtype)).sum().backward()
        results.append((out.detach(), [p.grad.clone() if p.grad is not None
                                       else torch.zeros_like(p) for p in model.parameters()]))
    return results


def _worker(rank, port, name, sizes, when, out_dir):
    import fused_resnet as fr

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    model = _model(name).train()
    fused = copy.deepcopy(model)
    if when == "before":
        fused = fr.fuse_(torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused))
    else:
        fused = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fr.fuse_(fused))
    torch.manual_seed(1)  # the same global batches on every process
    total = sum(sizes)
    batches = [torch.randn(total, 3, 48, 48) for _ in range(2)]
    weights = [torch.randn(total, 10) for _ in range(2)]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    got = _steps(fused, [b[lo:hi] for b in batches], [w[lo:hi] for w in weights])
    for _, grads in got:  # the gradient of the whole loss: every process's part, summed
        for g in grads:
            dist.all_reduce(g)
    torch.save({"got": got, "buffers": [b.clone() for b in fused.buffers()],
                "report": fused.fused_resnet_report, "slice": (lo, hi),
                "sync": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in fused.modules())},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _reference(name, sizes):
    torch.manual_seed(1)
    total = sum(sizes)
    batches = [torch.randn(total, 3, 48, 48) for _ in range(2)]
    weights = [torch.randn(total, 10) for _ in range(2)]
    plain, ref = plain_twin(_model(name).train()), _model(name).train().double()
    nchw = _model(name).train()
    return (_steps(plain, batches, weights), [b.clone() for b in plain.buffers()],
            _steps(ref, batches, weights), [b.clone() for b in ref.buffers()],
            _steps(nchw, batches, weights))


@pytest.mark.parametrize("name, sizes, when", [
    ("resnet18", (3, 1), "before"),
    ("resnet50", (2, 3), "after"),
    ("resnet18", (4, 0), "after")],  # one process with an empty batch
    ids=["resnet18-uneven-before", "resnet50-uneven-after", "resnet18-empty-after"])
def test_sync_batchnorm_fused_matches_the_global_batch(tmp_path, name, sizes, when):
    mp.spawn(_worker, args=(_free_port(), name, sizes, when, str(tmp_path)), nprocs=WORLD,
             join=True)
    plain, plain_buffers, ref, ref_buffers, nchw = _reference(name, sizes)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["report"]["left"] == {}, result["report"]
        assert len(result["report"]["fused"]) == (9 if name == "resnet18" else 17)
        assert result["sync"] > 0
        lo, hi = result["slice"]
        for step, ((out, grads), (out_p, grads_p), (out_r, grads_r), (_, grads_n)) in \
                enumerate(zip(result["got"], plain, ref, nchw)):
            c = compare(f"rank {rank} step {step} output", out, out_r[lo:hi], out_p[lo:hi])
            assert c.ok, c
            for i, (g, gp, gr, gn) in enumerate(zip(grads, grads_p, grads_r, grads_n)):
                # normwise, 4x PyTorch's error (test_fuse.py's fp32 training bound), the larger
                # of its channels_last and NCHW models': where a ReLU input lies within
                # rounding of zero either may flip it, moving upstream gradients (test_fuse's
                # test_training_steps_match_torchvision); resnet50, one parameter: fused
                # 1.6e-2, PyTorch channels_last 2.4e-3
                err = normwise_error(g, gr)
                err_plain = max(normwise_error(gp, gr), normwise_error(gn, gr))
                assert err <= max(4 * err_plain, 1e-4), \
                    f"rank {rank} step {step} parameter {i}: {err:.2e} (plain {err_plain:.2e})"
        for i, (b, bp, br) in enumerate(zip(result["buffers"], plain_buffers, ref_buffers)):
            if b.dtype == torch.long:
                assert torch.equal(b, bp), f"buffer {i}"
            else:
                c = compare(f"rank {rank} buffer {i}", b, br, bp)
                assert c.ok, c
