"""bn_relu_conv2d_bn_stats (fused_resnet/ops/bn_relu_conv.py): the previous conv's training BN +
ReLU applied on the way into this conv, with this conv's batch statistics; vs
conv2d(relu(F.batch_norm(z, training=True))) in values, statistics and every gradient (through
the batch statistics too), per backend; gradcheck in float64; what autograd keeps (the input,
never the activation); opcheck and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params, cpu_backend_params, requires_cuda
from fused_resnet import backend
from fused_resnet.verify import normwise_error

ops = torch.ops.fused_resnet

# (N, C_in, C_out, kernel, stride, padding, H=W, groups)
CONVS = [(2, 16, 24, 1, 1, 0, 7, 1), (1, 16, 40, 3, 1, 1, 7, 1), (2, 8, 20, 3, 2, 1, 9, 1),
         (2, 16, 32, 3, 1, 1, 6, 4)]  # grouped: library conv


def _ids(c):
    return f"n{c[0]}-{c[1]}to{c[2]}-k{c[3]}s{c[4]}p{c[5]}-hw{c[6]}-g{c[7]}"


def _problem(cfg, dtype=torch.float32, device="cpu"):
    """z (a previous conv's output, non-zero mean), BN parameters, conv weight, conv args."""
    n, cin, cout, k, s, p, hw, g = cfg
    z = (torch.randn(n, cin, hw, hw) * 2 + 0.5).to(device, dtype)
    z = z.contiguous(memory_format=torch.channels_last)
    bn_w, bn_b = torch.rand(cin) + 0.5, torch.randn(cin) * 0.5
    w = torch.randn(cout, cin // g, k, k) / (cin * k * k / g) ** 0.5
    return z, bn_w.to(device), bn_b.to(device), w.to(device, dtype), ([s, s], [p, p], [1, 1], g)


def _stats(t):
    """Batch mean and biased variance in the ops' statistics dtype (fp32; fp64 for fp64)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(t.detach().to(acc), dim=(0, 2, 3), unbiased=False)
    return mean, var


def _fused(z, bn_w, bn_b, w, conv_args, eps=1e-5):
    mean, var = _stats(z)
    return ops.bn_relu_conv2d_bn_stats(z, bn_w, bn_b, mean, var, eps, w, *conv_args)


def _reference(z, bn_w, bn_b, w, conv_args, eps=1e-5):
    a = torch.relu(F.batch_norm(z, None, None, bn_w, bn_b, training=True, eps=eps))
    out = F.conv2d(a, w, None, conv_args[0], conv_args[1], conv_args[2], conv_args[3])
    return (out, *_stats(out))


def _run_both(cfg, backend_name, dtype=torch.float32, device="cpu"):
    z, bn_w, bn_b, w, conv_args = _problem(cfg, dtype, device)
    results = []
    for fn in (_fused, _reference):
        leaves = [t.detach().clone().requires_grad_() for t in (z, bn_w, bn_b, w)]
        with backend.use(backend_name):
            out, mean, var = fn(*leaves, conv_args)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            grads = torch.autograd.grad(out, leaves, grad_out.to(out))
        results.append((out, mean, var, grads))
    return results


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("cfg", CONVS, ids=_ids)
def test_matches_batch_norm_relu_conv(backend_name, cfg):
    """fp32: a ReLU decision within rounding of zero may go either way, so gradients are
    compared normwise (a wrong or missing term, e.g. the batch-statistics path, is O(1))."""
    (out, mean, var, grads), (out_r, mean_r, var_r, grads_r) = _run_both(cfg, backend_name)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, mean_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, var_r, rtol=1e-4, atol=1e-5)
    for name, g, r in zip(("z", "bn weight", "bn bias", "conv weight"), grads, grads_r):
        err = normwise_error(g, r)
        assert err < 1e-4, f"grad {name}: normwise error {err:.2e}"


@pytest.mark.skipif(backend.why_not("cpp", "cpu") is not None, reason="fused_resnet._C is not built")
@pytest.mark.parametrize("cfg", CONVS, ids=_ids)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("wanted", ["all", "input", "params"])
def test_cpu_step_is_the_python_path(monkeypatch, cfg, channels_last, affine, wanted):
    """On the CPU the op's library path and its backward run as one C++ call each
    (bn_relu_conv2d_bn_stats_step[_backward]): the same kernels and conv on the same operands,
    so every output and gradient is bitwise the Python path's (forced here by turning the step
    off); and the step really ran (the profiler sees its op)."""
    from fused_resnet.ops import bn_relu_conv

    z, bn_w, bn_b, w, conv_args = _problem(cfg)
    if not channels_last:
        z = z.contiguous()
    if not affine:
        bn_w = bn_b = None
    mean, var = _stats(z)
    needs = {"all": (True, True, True), "input": (True, False, False),
             "params": (False, True, True)}[wanted]

    def run():
        leaves = [t.detach().clone().requires_grad_(need) if t is not None else None
                  for t, need in zip((z, bn_w, bn_b, w), needs + (True,))]
        out = bn_relu_conv.run(leaves[0], leaves[1], leaves[2], mean, var, 1e-5, leaves[3],
                               *conv_args)
        grad_out = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1))
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        return out, torch.autograd.grad(out[0], wrt, grad_out.to(out[0]))

    with torch.profiler.profile() as prof:
        stepped = run()
    names = {e.key for e in prof.key_averages()}
    assert {"fused_resnet::bn_relu_conv2d_bn_stats_step",
            "fused_resnet::bn_relu_conv2d_bn_stats_step_backward"} <= names, sorted(names)
    monkeypatch.setattr(bn_relu_conv, "_runs_cpu_step", lambda *args: False)
    monkeypatch.setattr(bn_relu_conv, "_runs_cpu_step_backward", lambda *args: False)
    python = run()
    for got, want in zip([*stepped[0], *stepped[1]], [*python[0], *python[1]]):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.stride() == want.stride()
        assert torch.equal(got, want)


def test_gradcheck_float64():
    z, bn_w, bn_b, w, conv_args = _problem(CONVS[2], torch.float64)
    leaves = [t.to(torch.float64).requires_grad_() for t in (z[:, :, :5, :5], bn_w, bn_b, w)]
    with backend.use("torch"):
        assert torch.autograd.gradcheck(lambda *t: _fused(*t, conv_args)[0], leaves)


def _saved_storages(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return {t.untyped_storage().data_ptr() for t in saved}, saved


def test_keeps_the_input_not_the_activation():
    z, bn_w, bn_b, w, conv_args = _problem(CONVS[1])
    z.requires_grad_(), w.requires_grad_()
    storages, saved = _saved_storages(lambda: _fused(z, bn_w, bn_b, w, conv_args))
    activation_sized = [t for t in saved if t.numel() == z.numel()]
    assert len(activation_sized) == 1 and activation_sized[0] is z
    assert z.untyped_storage().data_ptr() in storages


@pytest.mark.parametrize("backend_name", cpu_backend_params())
def test_opcheck(backend_name):
    z, bn_w, bn_b, w, conv_args = _problem(CONVS[1])
    mean, var = _stats(z)
    args = (z.requires_grad_(), bn_w.requires_grad_(), bn_b, mean, var, 1e-5,
            w.requires_grad_(), *conv_args)
    with backend.use(backend_name):
        torch.library.opcheck(ops.bn_relu_conv2d_bn_stats.default, args)


def test_torch_compile_fullgraph():
    z, bn_w, bn_b, w, conv_args = _problem(CONVS[0])
    leaves = [t.requires_grad_() for t in (z, bn_w, bn_b, w)]

    def step(*leaves):
        return _fused(*leaves, conv_args)[0].square().sum()

    eager = torch.autograd.grad(step(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True,
                                                 backend="aot_eager")(*leaves), leaves)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend_name", backend_params("cuda"))
@pytest.mark.parametrize("cfg", CONVS, ids=_ids)
def test_matches_on_cuda_bfloat16(backend_name, cfg):
    """bf16 on CUDA: values within bf16 rounding of the same computation in PyTorch, gradients
    normwise (both sides round activations and gradients to bf16: 8 bits of mantissa)."""
    if backend.why_not(backend_name, "cuda") is not None:
        pytest.skip(backend.why_not(backend_name, "cuda"))
    (out, mean, var, grads), (out_r, mean_r, var_r, grads_r) = _run_both(
        cfg, backend_name, torch.bfloat16, "cuda")
    torch.testing.assert_close(out.float(), out_r.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mean, mean_r, rtol=2e-2, atol=1e-2)
    for name, g, r in zip(("z", "bn weight", "bn bias", "conv weight"), grads, grads_r):
        err = normwise_error(g, r)
        assert err < 3e-2, f"grad {name}: normwise error {err:.2e}"
