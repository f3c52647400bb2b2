"""oneDNN's convolution against at::mm on ResNet-50 shapes, bf16, batch 8, channels_last
(README.md here). python conv_gemm_bf16.py"""
import time, statistics, torch
def t(f, n=15):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)
N = 8
dt = torch.bfloat16
for (Ci, Co, H) in [(1024, 256, 7), (256, 1024, 7), (2048, 512, 4), (512, 2048, 4), (1024, 256, 14), (256, 1024, 14), (512, 128, 14), (128, 512, 14), (512, 128, 28), (256, 64, 28)]:
    x = torch.randn(N, Ci, H, H).to(dt).contiguous(memory_format=torch.channels_last)
    w = torch.randn(Co, Ci, 1, 1).to(dt).contiguous(memory_format=torch.channels_last)
    g = torch.randn(N, Co, H, H).to(dt).contiguous(memory_format=torch.channels_last)
    x2 = x.permute(0, 2, 3, 1).reshape(-1, Ci); g2 = g.permute(0, 2, 3, 1).reshape(-1, Co); w2 = w.view(Co, Ci)
    cb = t(lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1,1], [0,0], [1,1], False, [0,0], 1, [True, True, False]))
    mb = t(lambda: (torch.mm(g2, w2), torch.mm(g2.t(), x2)))
    fw = t(lambda: torch.conv2d(x, w)); fm = t(lambda: torch.mm(x2, w2.t()))
    print(f"rows {N*H*H:6d} Ci {Ci:5d} Co {Co:5d}: fwd conv {fw:.3f} mm {fm:.3f} ({fw/fm:.2f}x) | bwd conv {cb:.3f} mm {mb:.3f} ({cb/mb:.2f}x)")
for (C, H, s) in [(512, 7, 1), (512, 4, 1), (256, 14, 1), (256, 7, 1), (128, 14, 1), (128, 28, 1)]:
    x = torch.randn(N, C, H, H).to(dt).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, C, 3, 3).to(dt).contiguous(memory_format=torch.channels_last)
    z = torch.conv2d(x, w, None, s, 1)
    g = torch.randn_like(z)
    Ho = z.shape[2]
    cols = torch.randn(N * Ho * Ho, 9 * C).to(dt); w2 = w.permute(0, 2, 3, 1).reshape(C, -1); g2 = g.permute(0, 2, 3, 1).reshape(-1, C)
    cf = t(lambda: torch.conv2d(x, w, None, s, 1)); mf = t(lambda: torch.mm(cols, w2.t()))
    cb = t(lambda: torch.ops.aten.convolution_backward(g, x, w, None, [s,s], [1,1], [1,1], False, [0,0], 1, [True, True, False]))
    mb = t(lambda: (torch.mm(g2, w2), torch.mm(g2.t(), cols)))
    print(f"3x3 px {N*Ho*Ho:5d} C {C}: fwd conv {cf:.3f} mm {mf:.3f} | bwd conv {cb:.3f} mm {mb:.3f} (bare GEMMs)")
