"""Runs every CUDA kernel of the C++ extension once per layout, dtype and an odd shape, and checks
each against the reference: the program to put under compute-sanitizer (memcheck, racecheck,
initcheck) on a GPU machine:

    compute-sanitizer --tool memcheck python tests/gpu_sanitize.py
"""

import sys

import torch

import fused_resnet  # noqa: F401
from fused_resnet import reference

ops = torch.ops.fused_resnet


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    failures = 0
    for shape in [(2, 3, 5, 7), (3, 130, 9, 7), (4, 64, 16, 16)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                x = torch.randn(shape, device="cuda").to(dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                r, g = torch.randn_like(x), torch.randn_like(x)
                c = shape[1]
                f = [torch.randn(c, device="cuda") for _ in range(5)]
                got = {
                    "stats": ops.bn_stats_cpp(x, f[3], f[4], 1e-5),
                    "apply": ops.bn_add_relu_apply_cpp(x, r, f[0], f[1], True, True),
                }
                mask = got["apply"][1]
                var = f[3].abs() + 0.5
                got["grad_reduce"] = ops.bn_add_relu_grad_reduce_cpp(g, mask, x, f[2], var, f[4],
                                                                     1e-5, True, True)
                got["grad_apply"] = ops.bn_add_relu_grad_apply_cpp(g, mask, x, *f[2:], f[0], True,
                                                                   True)
                want = {
                    "stats": reference.bn_stats(x, f[3], f[4], 1e-5),
                    "apply": reference.bn_add_relu_apply(x, r, f[0], f[1], True, True),
                    "grad_reduce": reference.bn_add_relu_grad_reduce(g, mask, x, f[2], var, f[4],
                                                                     1e-5, True, True),
                    "grad_apply": reference.bn_add_relu_grad_apply(g, mask, x, *f[2:], f[0],
                                                                   True, True),
                }
                torch.cuda.synchronize()
                for name in got:
                    for a, b in zip(got[name], want[name]):
                        ok = torch.equal(a, b) if a.dtype == torch.uint8 else torch.allclose(
                            a.float(), b.float(), rtol=1e-2, atol=1e-3)
                        if not ok:
                            failures += 1
                            print(f"MISMATCH {name} {shape} {dtype} cl={channels_last}")
    print(f"gpu_sanitize: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
