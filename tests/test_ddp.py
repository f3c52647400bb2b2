"""DistributedDataParallel with two CPU processes (gloo): a fused resnet18 and the unfused one,
same weights and data, end a training step with the same all-reduced gradients and the same
running statistics."""

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_resnet.verify import normwise_error

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    import torchvision

    import fused_resnet as fr

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    fused = fr.fuse_(copy.deepcopy(model))
    torch.manual_seed(100 + rank)  # each rank its own batch
    x = torch.randn(4, 3, 64, 64)
    target = torch.randint(0, 10, (4,))
    results = {}
    for name, m in (("plain", model), ("fused", fused), ("float64", copy.deepcopy(model).double())):
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        torch.nn.functional.cross_entropy(ddp(x.to(next(m.parameters()).dtype)), target).backward()
        results[name] = ([p.grad.clone() for p in m.parameters()],
                         [b.clone() for b in m.buffers()])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_fused_matches_unfused(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank, results in enumerate(per_rank):
        grads_p, buffers_p = results["plain"]
        grads_f, buffers_f = results["fused"]
        # All-reduced over both ranks; vs the float64 model, normwise, as test_fuse.py's fp32
        # test (a ReLU input within rounding of zero may decide either way in either model).
        flat_f, flat_p, flat_r = (torch.cat([g.flatten().double() for g in results[k][0]])
                                  for k in ("fused", "plain", "float64"))
        err, err_plain = normwise_error(flat_f, flat_r), normwise_error(flat_p, flat_r)
        assert err <= max(4 * err_plain, 1e-3), (rank, err, err_plain)
        for b, bp in zip(buffers_f, buffers_p):
            torch.testing.assert_close(b, bp, rtol=1e-4, atol=1e-5)
    # DDP keeps replicas identical: rank 0's gradients equal rank 1's
    for g0, g1 in zip(per_rank[0]["fused"][0], per_rank[1]["fused"][0]):
        torch.testing.assert_close(g0, g1)
