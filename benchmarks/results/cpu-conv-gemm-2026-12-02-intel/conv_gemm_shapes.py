"""oneDNN's convolution against at::mm (MKL) on ResNet-50's shapes, fp32, batch 8,
channels_last (README.md here). python conv_gemm_shapes.py"""
import time, statistics, torch


def t(f, n=15):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


N = 8

print("## 1x1, stride 1")
shapes = set()
for img in (112, 224):
    s = [img // 4, img // 8, img // 16, img // 32]
    w = [64, 128, 256, 512]
    for i in range(4):
        H = s[i]; width = w[i]; out = width * 4
        inp_first = 64 if i == 0 else out // 2
        shapes.add((inp_first, width, H)); shapes.add((out, width, H)); shapes.add((width, out, H))
tot_c = tot_m = 0
for (Ci, Co, H) in sorted(shapes, key=lambda s: (s[2], s[0])):
    x = torch.randn(N, Ci, H, H).contiguous(memory_format=torch.channels_last)
    w = torch.randn(Co, Ci, 1, 1).contiguous(memory_format=torch.channels_last)
    g = torch.randn(N, Co, H, H).contiguous(memory_format=torch.channels_last)
    x2 = x.permute(0, 2, 3, 1).reshape(-1, Ci); g2 = g.permute(0, 2, 3, 1).reshape(-1, Co); w2 = w.view(Co, Ci)
    cb = t(lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1,1], [0,0], [1,1], False, [0,0], 1, [True, True, False]))
    mb = t(lambda: (torch.mm(g2, w2), torch.mm(g2.t(), x2)))
    fw = t(lambda: torch.conv2d(x, w)); fm = t(lambda: torch.mm(x2, w2.t()))
    print(f"rows {N*H*H:6d} Ci {Ci:5d} Co {Co:5d}: fwd conv {fw:.3f} mm {fm:.3f} ({fw/fm:.2f}x) | bwd conv {cb:.3f} mm {mb:.3f} ({cb/mb:.2f}x)")

print("## 1x1, stride 2 (projections)")
for (Ci, Co, H) in [(256, 512, 28), (512, 1024, 14), (1024, 2048, 8), (256, 512, 56), (512, 1024, 28), (1024, 2048, 14)]:
    x = torch.randn(N, Ci, H, H).contiguous(memory_format=torch.channels_last)
    w = torch.randn(Co, Ci, 1, 1).contiguous(memory_format=torch.channels_last)
    Ho = H // 2
    g = torch.randn(N, Co, Ho, Ho).contiguous(memory_format=torch.channels_last)
    w2 = w.view(Co, Ci); g2 = g.permute(0, 2, 3, 1).reshape(-1, Co)
    def fwd_mm():
        xs = x[:, :, ::2, ::2].contiguous(memory_format=torch.channels_last)
        return torch.mm(xs.permute(0, 2, 3, 1).reshape(-1, Ci), w2.t())
    def bwd_mm():
        xs = x[:, :, ::2, ::2].contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, Ci)
        gx = torch.zeros_like(x)
        gx[:, :, ::2, ::2] = torch.mm(g2, w2).view(N, Ho, Ho, Ci).permute(0, 3, 1, 2)
        return gx, torch.mm(g2.t(), xs)
    cf = t(lambda: torch.conv2d(x, w, None, 2)); mf = t(fwd_mm)
    cb = t(lambda: torch.ops.aten.convolution_backward(g, x, w, None, [2,2], [0,0], [1,1], False, [0,0], 1, [True, True, False]))
    mb = t(bwd_mm)
    print(f"out pixels {N*Ho*Ho:5d} {Ci}->{Co}: fwd conv {cf:.3f} mm {mf:.3f} | bwd conv {cb:.3f} mm {mb:.3f}")

print("## 3x3 against the bare GEMMs of its im2col form")
for (C, H, s) in [(512, 7, 1), (512, 14, 2), (512, 4, 1), (512, 7, 2), (256, 14, 1), (256, 7, 1)]:
    x = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, C, 3, 3).contiguous(memory_format=torch.channels_last)
    z = torch.conv2d(x, w, None, s, 1)
    g = torch.randn_like(z)
    Ho = z.shape[2]; P = N * Ho * Ho
    cols = torch.randn(P, 9 * C); w2 = torch.randn(C, 9 * C); g2 = torch.randn(P, C)
    cf = t(lambda: torch.conv2d(x, w, None, s, 1))
    cb = t(lambda: torch.ops.aten.convolution_backward(g, x, w, None, [s,s], [1,1], [1,1], False, [0,0], 1, [True, True, False]))
    mf = t(lambda: torch.mm(cols, w2.t()))
    mb = t(lambda: (torch.mm(g2, w2), torch.mm(g2.t(), cols)))
    print(f"{C}x{H} s{s} px {P}: conv fwd {cf:.3f} bwd {cb:.3f} | bare gemm fwd {mf:.3f} bwd {mb:.3f}")
