"""The C++ CPU kernels are compiled once per instruction set (csrc/cpu/bn_add_relu_{base,avx2,
avx512}.cpp) and pick the one PyTorch uses here: each copy is run, in a subprocess with
PyTorch's own ATEN_CPU_CAPABILITY override, against the float64 reference of every piece, NCHW
and NHWC (channel counts that leave vector tails), with a ReLU mask and a residual."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from fused_resnet import _extension

SCRIPT = r"""
import json, torch
import fused_resnet as fr
from fused_resnet import _extension
torch.manual_seed(0)
errors = {}
for cl in (False, True):
    for shape in [(3, 37, 5, 7), (2, 64, 9, 9), (2, 19, 1, 33)]:
        z = torch.randn(shape) * 3 + 2
        r = torch.randn(shape)
        if cl:
            z, r = (t.contiguous(memory_format=torch.channels_last) for t in (z, r))
        w = torch.rand(shape[1]) + 0.5
        b = torch.randn(shape[1])
        z.requires_grad_(True), r.requires_grad_(True), w.requires_grad_(True)
        out = fr.functional.batch_norm_add_relu(z, r, None, None, w, b, training=True)
        g = torch.randn_like(out)
        out.backward(g)
        zd, rd, wd = (t.detach().double().requires_grad_(True) for t in (z, r, w))
        ref = torch.relu(torch.nn.functional.batch_norm(zd, None, None, wd, b.double(),
                                                         training=True) + rd)
        ref.backward(g.double())
        for name, got, want in [("out", out, ref), ("dz", z.grad, zd.grad),
                                ("dr", r.grad, rd.grad), ("dw", w.grad, wd.grad)]:
            err = ((got.double() - want).norm() / want.norm()).item()
            key = name + (" nhwc" if cl else " nchw")
            errors[key] = max(errors.get(key, 0.0), err)
print(json.dumps({"isa": _extension.load().cpu_isa, "errors": errors}))
"""

# PyTorch's names for the override, and the copy of our kernels each must select
CAPABILITIES = {"default": "base", "avx2": "avx2", "avx512": "avx512"}


def _run(capability: str) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    with tempfile.TemporaryDirectory() as outside:  # not the source tree (unbuilt package)
        run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                             env=env, cwd=outside, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _extension.available(), reason="fused_resnet._C is not built")
@pytest.mark.parametrize("capability", sorted(CAPABILITIES))
def test_each_instruction_set_copy_is_exact(capability):
    supported = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    if supported not in order or order.index(capability) > order.index(supported):
        pytest.skip(f"this CPU runs PyTorch at {supported}: {capability} cannot be tested here")
    result = _run(capability)
    multi = sys.platform.startswith("linux") and os.uname().machine == "x86_64"
    assert result["isa"] == (CAPABILITIES[capability] if multi else "base")
    for key, err in result["errors"].items():
        # fp32 BN statistics and gradients: ~1e-7 relative per element, a few hundred
        # elements per channel; a wrong lane, tail or mask bit is O(1e-2) or more
        assert err < 2e-5, f"{capability}: {key} normwise error {err:.2e}"
