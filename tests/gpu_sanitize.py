"""The program to put under compute-sanitizer (memcheck, racecheck) on a GPU machine: every
CUDA kernel of the package once per dtype, layout and an odd shape, each result checked
against the reference computed on the CPU (so no library kernel runs under the sanitizer
besides PyTorch's copies and casts):

- the BatchNorm kernels of _C (stats, apply, grad_reduce, grad_apply), on the vector path
  (numel a multiple of 8, 16-byte aligned) and the scalar paths (odd sizes; a misaligned view);
- the CUTLASS convs (conv2d_bias_act_cutlass, fp16/bf16, ReLU/identity; the fp16 ConvBNfprop
  bn_relu_conv2d_cutlass), on both tile sizes: the large 128x128 tile that every ResNet-50
  conv takes at batch 256 (cutlass_conv_plan picks it from ~132 output tiles up), reached here
  with the fewest output tiles that still select it, and the small 64x64 tile; and with every
  operand a misaligned view (odd storage offsets), which the glue must copy to aligned storage
  (the dry run checks that copy, cutlass_launch_operand, on CPU tensors);
- the Triton implicit-GEMM conv (epilogue, statistics, BN + ReLU prologue, projection
  shortcut, the padded C_in=3 stem), every tile config the launcher measures for the shape.

    compute-sanitizer --tool memcheck --error-exitcode 9 python tests/gpu_sanitize.py
    python tests/gpu_sanitize.py --dry-run     # no GPU: the same cases on CPU tensors
    python tests/gpu_sanitize.py --parts bn,triton   # only these parts (aim the sanitizer:
                                               # bn, cutlass_plans, cutlass, cutlass_misaligned,
                                               # triton; default all)

--dry-run (what benchmarks/gpu_session.sh --dry-run runs, so this file cannot rot): the BN
cases run the C++ CPU kernels, the Triton cases run under the interpreter at tiny sizes, and
the CUTLASS cases check that the plan picks the tile each case is meant to cover.
Exit status: 0 clean, 1 mismatches (compute-sanitizer's own findings: its --error-exitcode).
"""

import os
import sys

import torch

DRY_RUN = "--dry-run" in sys.argv[1:]
# GPU presence is torch's answer; asking it does not import triton (which reads this on import)
if DRY_RUN or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import fused_resnet  # noqa: E402,F401  (registers torch.ops.fused_resnet)
from fused_resnet import _extension, reference  # noqa: E402

ops = torch.ops.fused_resnet
LARGE, SMALL = 0, 1  # CutlassTile (csrc/common/cutlass_conv_plan.h)

# BN: (shape, storage offset in elements). (2,3,5,7) and (3,130,9,7): numel not a multiple
# of 8 (scalar path); (4,64,16,16): vector path; the same with offset 1: misaligned (scalar).
BN_CASES = [((2, 3, 5, 7), 0), ((3, 130, 9, 7), 0), ((4, 64, 16, 16), 0), ((4, 64, 16, 16), 1)]

# CUTLASS: (name, n, c_in, c_out, kernel, stride, pad, H=W, residual, relu, tile). Each runs
# in fp16 and bf16 (and, with c_in % 8 == 0, bn_relu_conv2d_cutlass in fp16), so every
# instantiation ({fp16, bf16} x {ReLU, identity} x {large, small}; ConvBNfprop large/small)
# runs at least once. Large cases: 133-140 output tiles of 128x128, the fewest that select the
# large tile, so they stay short under the sanitizer.
CUTLASS_CASES = [
    ("stem 7x7/2, C=3 padded", 2, 3, 64, 7, 2, 3, 33, False, True, SMALL),
    ("3x3 + residual", 3, 64, 64, 3, 1, 1, 15, True, True, SMALL),
    ("1x1/2 + residual", 2, 256, 512, 1, 2, 0, 14, True, True, SMALL),
    ("3x3 512, identity", 1, 512, 512, 3, 1, 1, 7, False, False, SMALL),
    ("stem 7x7/2, C=3 padded", 2, 3, 64, 7, 2, 3, 184, False, True, LARGE),
    ("3x3 64->512", 1, 64, 512, 3, 1, 1, 66, False, True, LARGE),
    ("1x1 64->1024 + residual", 1, 64, 1024, 1, 1, 0, 46, True, True, LARGE),
    ("1x1/2 256->512 projection, identity", 1, 256, 512, 1, 2, 0, 130, False, False, LARGE),
]

# Triton conv: (name, n, c_in, c_out, kernel, stride, pad, H=W, options); dry run: n=1, H=W<=8
TRITON_CASES = [
    ("3x3 scale+bias+residual+relu, stats", 2, 64, 128, 3, 1, 1, 12,
     {"scale", "bias", "residual", "relu", "stats"}),
    ("stem 7x7/2 C=3, bias+relu", 2, 3, 64, 7, 2, 3, 20, {"bias", "relu"}),
    ("3x3 BN+ReLU prologue, stats", 2, 64, 64, 3, 1, 1, 10, {"prologue", "stats"}),
    ("1x1 + 1x1/2 projection shortcut, bias+relu", 2, 64, 256, 1, 1, 0, 8,
     {"shortcut", "bias", "relu"}),
]


class Checker:
    def __init__(self, device):
        self.device = device
        self.cases = 0
        self.failures = 0

    def check(self, what, ok, detail=""):
        self.cases += 1
        if not ok:
            self.failures += 1
            print(f"MISMATCH {what} {detail}", flush=True)

    def close(self, what, got, want, tol):
        """Normwise relative error of got against want (both moved to CPU fp64) <= tol."""
        got, want = got.detach().cpu().double(), want.detach().cpu().double()
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        self.check(what, got.shape == want.shape and err <= tol,
                   f"(error {err:.2e} > {tol:.0e})" if got.shape == want.shape else
                   f"(shape {tuple(got.shape)} != {tuple(want.shape)})")


def _dev(t, device):
    return t.to(device) if t is not None else None


def bn_cases(chk: Checker) -> None:
    """The four BN kernels against reference.* on CPU copies of the same inputs."""
    for shape, offset in BN_CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                numel = torch.Size(shape).numel()
                x = torch.randn(numel + offset)[offset:].view(shape).to(dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                r, g = torch.randn_like(x), torch.randn_like(x)
                c = shape[1]
                f = [torch.randn(c) for _ in range(5)]
                var = f[3].abs() + 0.5
                d = chk.device
                xd, rd, gd = (_dev(t, d) for t in (x, r, g))
                fd = [_dev(t, d) for t in f]
                vard = _dev(var, d)
                if offset:  # the device copy misaligned too, same strides
                    xd = torch.empty(numel + offset, dtype=dtype, device=d).as_strided(
                        shape, x.stride(), offset)
                    xd.copy_(x)
                got = {"stats": ops.bn_stats_cpp(xd, fd[3], fd[4], 1e-5),
                       "apply": ops.bn_add_relu_apply_cpp(xd, rd, fd[0], fd[1], True, True)}
                mask = got["apply"][1]
                got["grad_reduce"] = ops.bn_add_relu_grad_reduce_cpp(
                    gd, mask, xd, fd[2], vard, fd[4], 1e-5, True, True)
                got["grad_apply"] = ops.bn_add_relu_grad_apply_cpp(
                    gd, mask, xd, *fd[2:], fd[0], True, True)
                mask_cpu = mask.cpu()
                want = {"stats": reference.bn_stats(x, f[3], f[4], 1e-5),
                        "apply": reference.bn_add_relu_apply(x, r, f[0], f[1], True, True),
                        "grad_reduce": reference.bn_add_relu_grad_reduce(
                            g, mask_cpu, x, f[2], var, f[4], 1e-5, True, True),
                        "grad_apply": reference.bn_add_relu_grad_apply(
                            g, mask_cpu, x, *f[2:], f[0], True, True)}
                if d == "cuda":
                    torch.cuda.synchronize()
                label = f"bn {shape}+{offset} {str(dtype)[6:]} cl={channels_last}"
                for name in got:
                    for i, (a, b) in enumerate(zip(got[name], want[name])):
                        a = a.cpu()
                        if a.dtype == torch.uint8:  # packed ReLU mask: bits may differ only
                            bad = (a != b).sum().item()  # where y rounds to ~0
                            chk.check(f"{label} {name}[{i}]", a.shape == b.shape and
                                      bad <= max(1, a.numel() // 1000), f"({bad} bytes differ)")
                        else:
                            chk.check(f"{label} {name}[{i}]", torch.allclose(
                                a.float(), b.float(), rtol=1e-2, atol=1e-3))


def cutlass_plans(chk: Checker) -> None:
    """Each case selects the tile it is meant to cover (runs on every build: the plan is
    host code compiled into _C even without CUDA)."""
    module = _extension.load()
    if module is None:
        chk.check("cutlass plan", False, f"(no _C: {_extension.error()})")
        return
    for name, n, cin, cout, k, s, p, hw, _, _, tile in CUTLASS_CASES:
        reason, _, _, _, got = module.cutlass_conv_plan(n, hw, hw, cin, cout, k, k, s, p, 1, 1, 2)
        chk.check(f"cutlass plan {name} {n}x{cin}x{hw}x{hw}", reason is None and got == tile,
                  f"(plan: {reason or ('large' if got == LARGE else 'small')} tile, case "
                  f"meant for the {'large' if tile == LARGE else 'small'} one)")


def cutlass_cases(chk: Checker) -> None:
    if not getattr(_extension.load(), "with_cutlass", 0):
        chk.check("cutlass conv", False, "(_C was built without the CUTLASS conv kernels)")
        return
    for name, n, cin, cout, k, s, p, hw, residual, relu, tile in CUTLASS_CASES:
        label = f"cutlass {'large' if tile == LARGE else 'small'} {name}"
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(n, cin, hw, hw).to(dtype)
            w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
            bias = torch.randn(cout)
            z = F.conv2d(x.float(), w.float(), bias, s, p)
            r = torch.randn_like(z).to(dtype) if residual else None
            got = ops.conv2d_bias_act_cutlass(x.cuda(), w.cuda(), s, p, bias.cuda(),
                                              _dev(r, "cuda"), relu)
            want = z + r.float() if residual else z
            chk.close(f"{label} {str(dtype)[6:]}", got, torch.relu(want) if relu else want, 2e-2)
            if dtype == torch.float16 and cin % 8 == 0:  # ConvBNfprop: BN + ReLU prologue
                scale, shift = torch.rand(cin) + 0.5, torch.randn(cin)
                got = ops.bn_relu_conv2d_cutlass(x.cuda(), scale.cuda(), shift.cuda(), w.cuda(),
                                                 s, p)
                a = torch.relu(x.float() * scale.half().float().view(1, -1, 1, 1)
                               + shift.half().float().view(1, -1, 1, 1))
                chk.close(f"{label} bn_relu_conv fp16", got, F.conv2d(a, w.float(), None, s, p),
                          2e-2)


def _at_offset(t, offset):
    """t's values and strides, `offset` elements into a new storage: a misaligned view."""
    view = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device).as_strided(
        t.shape, t.stride(), offset)
    return view.copy_(t)


# operand of the CUTLASS glue -> (alignment in bytes, dtype, 4-D): csrc/common/cutlass_conv_plan.h
CUTLASS_OPERANDS = {"activation": (16, torch.float16, True), "filter": (16, torch.bfloat16, True),
                    "output": (16, torch.float16, True), "residual": (16, torch.float16, True),
                    "bias": (32, torch.float32, False), "bn_scale": (16, torch.float16, False),
                    "bn_shift": (16, torch.float16, False)}


def cutlass_misaligned(chk: Checker) -> None:
    """Misaligned views as CUTLASS operands. GPU: each op with every operand at an odd storage
    offset gives the aligned operands' result exactly (and memcheck sees no misaligned access).
    Dry run: the glue's copy to aligned storage (cutlass_launch_operand) on CPU tensors."""
    if not getattr(_extension.load(), "with_cutlass", 0):
        if chk.device == "cuda":
            chk.check("cutlass misaligned", False, "(_C was built without the CUTLASS kernels)")
        else:
            print("gpu_sanitize: cutlass misaligned: skipped (_C without the CUTLASS glue)")
        return
    if chk.device != "cuda":
        for operand, (align, dtype, four_d) in CUTLASS_OPERANDS.items():
            t = torch.randn(2, 8, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last) \
                if four_d else torch.randn(24).to(dtype)
            for offset in range(2 * align // t.element_size()):
                got = ops.cutlass_launch_operand(_at_offset(t, offset), operand)
                chk.check(f"cutlass operand {operand}+{offset}",
                          got.data_ptr() % align == 0 and torch.equal(got, t))
        return
    cl = torch.channels_last
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2, 64, 15, 15).to(dtype).contiguous(memory_format=cl).cuda()
        w = (torch.randn(64, 64, 3, 3) / 24).to(dtype).contiguous(memory_format=cl).cuda()
        bias, r = torch.randn(64).cuda(), torch.randn_like(x)
        want = ops.conv2d_bias_act_cutlass(x, w, 1, 1, bias, r, True)
        got = ops.conv2d_bias_act_cutlass(_at_offset(x, 1), _at_offset(w, 3),
                                          _at_offset(bias, 4), _at_offset(r, 5), True)
        chk.check(f"cutlass misaligned operands {str(dtype)[6:]}",
                  torch.equal(got.cpu(), want.cpu()))
        if dtype == torch.float16:
            scale, shift = (torch.rand(64) + 0.5).half().cuda(), torch.randn(64).half().cuda()
            want = ops.bn_relu_conv2d_cutlass(x, scale, shift, w, 1, 1)
            got = ops.bn_relu_conv2d_cutlass(_at_offset(x, 7), _at_offset(scale, 1),
                                             _at_offset(shift, 3), _at_offset(w, 1), 1, 1)
            chk.check("cutlass misaligned operands bn_relu_conv fp16",
                      torch.equal(got.cpu(), want.cpu()))


def triton_cases(chk: Checker) -> None:
    """fused_resnet.kernels.conv.conv2d_nhwc with config=None: on a GPU the launcher measures
    every tile config it offers for the shape (each runs under the sanitizer), then runs the
    fastest; the result is checked. Dry run: the interpreter, fp32, tiny sizes."""
    from fused_resnet.kernels import conv as kconv

    dev = chk.device
    dtypes = (torch.bfloat16, torch.float16) if dev == "cuda" else (torch.float32,)
    for name, n, cin, cout, k, s, p, hw, options in TRITON_CASES:
        if dev != "cuda":
            n, hw = 1, min(hw, 8)
        for dtype in dtypes:
            cl = torch.channels_last
            x = torch.randn(n, cin, hw, hw).to(dtype)
            w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
            scale = torch.rand(cout) + 0.5 if "scale" in options else None
            bias = torch.randn(cout) if "bias" in options else None
            prologue = (torch.randn(cin), torch.rand(cin) + 0.5, torch.randn(cin)) \
                if "prologue" in options else None  # (mean, scale, shift)
            a = x.float()
            if prologue is not None:
                mean, pscale, pshift = (t.view(1, -1, 1, 1) for t in prologue)
                a = torch.relu((a - mean) * pscale + pshift)
            z = F.conv2d(a, w.float(), None, s, p)
            shortcut = None
            if "shortcut" in options:
                x2 = torch.randn(n, 2 * cin, 2 * hw, 2 * hw).to(dtype)
                w2 = (torch.randn(cout, 2 * cin, 1, 1) / (2 * cin) ** 0.5).to(dtype)
                z = z + F.conv2d(x2.float(), w2.float(), None, 2)
                shortcut = (x2.to(dev).contiguous(memory_format=cl),
                            kconv.pack_weight(w2.to(dev)), 2)
            residual = torch.randn_like(z).to(dtype) if "residual" in options else None
            y = z
            if scale is not None:
                y = y * scale.view(1, -1, 1, 1)
            if bias is not None:
                y = y + bias.view(1, -1, 1, 1)
            if residual is not None:
                y = y + residual.float()
            if "relu" in options:
                y = torch.relu(y)
            out, stats = kconv.conv2d_nhwc(
                x.to(dev).contiguous(memory_format=cl), kconv.pack_weight(w.to(dev)), s, p,
                scale=_dev(scale, dev), bias=_dev(bias, dev),
                residual=_dev(residual, dev).contiguous(memory_format=cl)
                if residual is not None else None,
                relu="relu" in options, stats="stats" in options, shortcut=shortcut,
                prologue=tuple(t.to(dev) for t in prologue) if prologue is not None else None)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            label = f"triton {name} {str(dtype)[6:]}"
            chk.close(label, out, y, tol)
            if "stats" in options:
                var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
                chk.close(f"{label} mean", stats[0], mean, tol)
                chk.close(f"{label} var", stats[1], var, tol)


def _chosen_parts(names: list) -> set:
    """--parts a,b (names with '_' for ' '): those parts only; none given: all."""
    args = sys.argv[1:]
    if "--parts" not in args:
        return set(names)
    wanted = {w.replace("_", " ") for w in args[args.index("--parts") + 1].split(",") if w}
    unknown = wanted - set(names)
    if unknown:
        raise SystemExit(f"gpu_sanitize: unknown part(s) {sorted(unknown)}; parts here: "
                         f"{', '.join(n.replace(' ', '_') for n in names)}")
    return wanted


def main() -> int:
    device = "cpu" if DRY_RUN else "cuda"
    if device == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA device (or --dry-run)"
        assert _extension.with_cuda(), f"_C has no CUDA kernels: {_extension.error()}"
    torch.manual_seed(0)
    chk = Checker(device)
    parts = [("bn", bn_cases), ("cutlass plans", cutlass_plans)]
    parts += [("cutlass", cutlass_cases)] if device == "cuda" else []
    parts += [("cutlass misaligned", cutlass_misaligned)]
    parts += [("triton", triton_cases)]
    chosen = _chosen_parts([name for name, _ in parts])
    for name, part in parts:
        if name not in chosen:
            continue
        before = chk.cases
        part(chk)
        print(f"gpu_sanitize: {name}: {chk.cases - before} checks", flush=True)
    mode = " (dry run: CPU tensors; CUTLASS: plans and operand alignment only)" if DRY_RUN else ""
    print(f"gpu_sanitize: {chk.failures} mismatches in {chk.cases} checks{mode}")
    return 1 if chk.failures else 0


if __name__ == "__main__":
    sys.exit(main())
