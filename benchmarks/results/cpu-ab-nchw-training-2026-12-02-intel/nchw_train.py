import sys, time, statistics, copy, torch, torchvision
import fused_resnet as fr
torch.manual_seed(0)
size = int(sys.argv[1]); rounds = int(sys.argv[2])
base = torchvision.models.resnet50()
eager = copy.deepcopy(base)
fused = fr.fuse_(copy.deepcopy(base))
x = torch.randn(8, 3, size, size); t = torch.randint(0, 1000, (8,))
models = {"eager_nchw": eager, "fused_nchw": fused}
opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
def step(k):
    m = models[k]; m.train(); opts[k].zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(m(x), t); loss.backward(); opts[k].step()
for k in models: step(k); step(k)
times = {k: [] for k in models}
for r in range(rounds):
    for k in (models if r % 2 == 0 else list(models)[::-1]):
        t0 = time.perf_counter(); step(k); times[k].append(time.perf_counter() - t0)
for k, v in times.items():
    print(k, "median ms %.1f" % (1e3 * statistics.median(v)), "min %.1f max %.1f" % (1e3*min(v), 1e3*max(v)))
print("fused/eager speed ratio %.3f" % (statistics.median(times["eager_nchw"]) / statistics.median(times["fused_nchw"])))
