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
    failures += _cutlass_conv()
    print(f"gpu_sanitize: {failures} mismatches")
    return 1 if failures else 0


def _cutlass_conv() -> int:
    """One CUTLASS conv of each kind (stem with padded channels, 3x3, strided 1x1 with a
    residual, a small-tile problem), each dtype."""
    from fused_resnet import _extension

    if not getattr(_extension.load(), "with_cutlass", 0):
        print("gpu_sanitize: built without the CUTLASS conv kernels, skipped")
        return 0
    failures = 0
    for cin, cout, k, s, p, hw, n, residual in [(3, 64, 7, 2, 3, 33, 2, False),
                                                  (64, 64, 3, 1, 1, 15, 3, True),
                                                  (256, 512, 1, 2, 0, 14, 2, True),
                                                  (512, 512, 3, 1, 1, 7, 1, False)]:
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(n, cin, hw, hw, device="cuda").to(dtype)
            w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype)
            bias = torch.randn(cout, device="cuda")
            z = torch.nn.functional.conv2d(x.float(), w.float(), bias, s, p)
            r = torch.randn_like(z).to(dtype) if residual else None
            got = ops.conv2d_bias_act_cutlass(x, w, s, p, bias, r, True)
            want = torch.relu(z + (r.float() if residual else 0))
            torch.cuda.synchronize()
            if not torch.allclose(got.float(), want, rtol=3e-2, atol=3e-2):
                failures += 1
                print(f"MISMATCH cutlass conv {cin}->{cout} k{k} s{s} {dtype}")
            if dtype == torch.float16 and cin % 8 == 0:  # ConvBNfprop: BN + ReLU prologue
                scale, shift = torch.rand(cin, device="cuda") + 0.5, torch.randn(cin, device="cuda")
                got = ops.bn_relu_conv2d_cutlass(x, scale, shift, w, s, p)
                a = torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
                want = torch.nn.functional.conv2d(a, w.float(), None, s, p)
                torch.cuda.synchronize()
                if not torch.allclose(got.float(), want, rtol=3e-2, atol=3e-2):
                    failures += 1
                    print(f"MISMATCH cutlass bn_relu_conv {cin}->{cout} k{k} s{s}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
