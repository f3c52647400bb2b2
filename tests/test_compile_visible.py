"""What torch.compile / torch.export see of a fused model.

- The BN + add + ReLU pieces of the Triton backend are torch.library.triton_ops: where they run
  (CUDA, Triton backend), tracing sees bn_add_relu as its pieces and, one level down, their
  kernel launches (triton_kernel_wrapper_functional nodes), which Inductor compiles and
  AOTInductor packages. Checked here without a GPU: tracing on fake CUDA tensors (a subprocess
  without the Triton interpreter, whose kernels cannot be traced, and with Triton told the
  target is sm_90, which it needs to analyse the kernels); the compiled run on a GPU is
  GPU-marked.
- An AOTInductor package of a fused eval model runs on the CPU and matches the unfused model.
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import fused_resnet as fr
from conftest import requires_cuda

_TRACE = textwrap.dedent('''
    import json, os
    import torch, triton, torchvision
    from triton.backends.compiler import GPUTarget
    import fused_resnet as fr
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Sm90:  # Triton's kernel analysis asks the active driver for its target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
    triton.runtime.driver.set_active(Sm90())

    class Step(torch.nn.Module):
        """The block-end step of a residual block in training: relu(bn(z) + shortcut)."""
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(16, device="cuda")
        def forward(self, z, shortcut):
            bn = self.bn
            return (fr.functional.batch_norm_add_relu(
                z, shortcut, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                training=True, momentum=bn.momentum, eps=bn.eps,
                num_batches_tracked=bn.num_batches_tracked).square().sum(),)

    result = {}
    mode = FakeTensorMode()
    with mode:
        step = Step().requires_grad_(False)
        z, shortcut = (torch.empty(2, 16, 8, 8, device="cuda") for _ in range(2))
        # Dynamo (strict export): one graph, the Triton pieces in it, no opaque bn_add_relu
        exported = torch.export.export(step, (z, shortcut), strict=True)
        result["export"] = [str(n.target) for n in exported.graph.nodes
                            if n.op == "call_function"]
        # functionalized (what Inductor lowers): the kernel launches themselves
        graph, _ = aot_export_module(step, (z, shortcut), trace_joint=False)
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        result["kernels"] = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                             for n in graph.graph.nodes if n.op == "call_function"
                             and "triton_kernel_wrapper" in str(n.target)]
        # a whole fused bottleneck in training: still one graph
        with torch.device("cuda"):
            block = fr.FusedBottleneck.from_block(
                torchvision.models.resnet.Bottleneck(64, 16, downsample=None))
        x = torch.empty(2, 64, 8, 8, device="cuda")
        exported = torch.export.export(block.requires_grad_(False), (x,), strict=True)
        result["block"] = [str(n.target) for n in exported.graph.nodes
                           if n.op == "call_function"]
    print(json.dumps(result))
''')


def _trace_on_fake_cuda(cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FUSED_RESNET_BACKEND"] = "triton"
    # not from the repository root: `python -c` would import its unbuilt source tree
    done = subprocess.run([sys.executable, "-c", _TRACE], env=env, capture_output=True,
                          text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    import json
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    return _trace_on_fake_cuda(tmp_path_factory.mktemp("trace"))


def test_export_sees_the_triton_pieces_not_an_opaque_op(traced):
    ops = traced["export"]
    assert "fused_resnet.bn_stats_triton.default" in ops
    assert "fused_resnet.bn_add_relu_apply_triton.default" in ops
    assert not any(op.startswith("fused_resnet.bn_add_relu.") for op in ops), ops


def test_functionalized_graph_holds_the_kernel_launches(traced):
    """The launches Inductor compiles: statistics (partial sums and their merge) and the
    fused normalise + add + ReLU."""
    assert traced["kernels"] == ["_stats_partial_kernel", "_stats_final_kernel",
                                 "_apply_kernel"], traced["kernels"]


def test_fused_block_exports_as_one_graph_with_the_pieces(traced):
    ops = traced["block"]
    # the convs keep their measured choice at run time (opaque conv ops); the block-end BN
    # + add + ReLU is traced as its pieces
    assert "fused_resnet.conv2d_bn_stats.default" in ops
    assert "fused_resnet.bn_add_relu_apply_triton.default" in ops


@requires_cuda
def test_torch_compile_traces_into_triton_kernels_on_gpu(monkeypatch):
    """On a GPU with the Triton backend: torch.compile(fullgraph=True) of a fused ResNet-18
    training step has the Triton pieces in its graph (no graph break), and its loss and
    gradients match eager's."""
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "triton")
    torch.manual_seed(0)
    model = fr.fuse_(torchvision.models.resnet18(num_classes=10)).cuda().train()
    compiled_model = copy.deepcopy(model)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    want = model(x).square().mean()
    want.backward()
    got = compiled(x).square().mean()
    got.backward()
    assert any("bn_add_relu_apply_triton" in op for op in seen), seen
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2e-2, atol=1e-3,
                                   msg=lambda m: f"{name}: {m}")


def test_aot_inductor_package_of_a_fused_eval_model_runs_on_cpu(tmp_path):
    """torch.export of a fused eval ResNet-18 and an AOTInductor package of it, loaded and run
    on the CPU: the same outputs as the unfused model (the fused ops run from the package
    through AOTInductor's proxy executor, with fused_resnet imported)."""
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10).eval()
    fused = fr.fuse_(copy.deepcopy(plain))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exported = torch.export.export(fused, (x,))
    assert any("fused_resnet" in str(n.target) for n in exported.graph.nodes)
    path = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp_path / "fused_resnet18.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x), rtol=1e-4, atol=1e-4)
