"""The fused convolution ops (fused_resnet/ops/conv.py) on every backend usable here: results vs
F.conv2d + the epilogue in float64 and in the same dtype, BN folding, the training chain
conv2d_bn_stats -> batch_norm_add_relu vs conv -> BN -> add -> ReLU (values, gradients, running
statistics), opcheck and torch.compile."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fused_resnet as fr
from conftest import cpu_backend_params
from fused_resnet import backend, fold, tuning
from fused_resnet.reference import conv_epilogue
from fused_resnet.ops import conv as conv_ops
from fused_resnet.verify import compare

ops = torch.ops.fused_resnet

# (N, C_in, C_out, kernel, stride, padding, H=W, dilation, groups)
CONVS = [(2, 16, 24, 1, 1, 0, 7, 1, 1), (2, 32, 20, 1, 2, 0, 8, 1, 1),
         (1, 16, 40, 3, 1, 1, 7, 1, 1), (2, 8, 20, 3, 2, 1, 9, 1, 1),
         (2, 3, 16, 7, 2, 3, 13, 1, 1),
         (2, 16, 16, 3, 1, 2, 7, 2, 1),   # dilation: library path
         (2, 16, 32, 3, 1, 1, 6, 1, 4)]   # grouped (ResNeXt): library path


def _ids(c):
    return f"n{c[0]}-{c[1]}to{c[2]}-k{c[3]}s{c[4]}p{c[5]}-hw{c[6]}-d{c[7]}g{c[8]}"


def _args(cfg, dtype, channels_last=True):
    n, cin, cout, k, s, p, hw, d, g = cfg
    x = torch.randn(n, cin, hw, hw).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin // g, k, k) / (cin * k * k / g) ** 0.5).to(dtype)
    return x, w, [s, s], [p, p], [d, d], g


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("cfg", CONVS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_conv2d_epilogue(backend_name, cfg, dtype, channels_last):
    x, w, stride, padding, dilation, groups = _args(cfg, dtype, channels_last)
    cout = w.shape[0]
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
    ref_shape = F.conv2d(x.float(), w.float(), None, stride, padding, dilation, groups).shape
    residual = torch.randn(ref_shape).to(dtype)
    with backend.use(backend_name):
        out = ops.conv2d_epilogue(x, w, stride, padding, dilation, groups, scale, bias, residual,
                                  True)
    assert out.shape == ref_shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)

    def reference(dt):
        z = F.conv2d(x.to(dt), w.to(dt), None, stride, padding, dilation, groups)
        return conv_epilogue(z, scale, bias, residual.to(dt), True)

    c = compare("conv2d_epilogue", out, reference(torch.float64),
                reference(torch.float32).to(dtype))
    assert c.ok, c


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("shortcut_stride", [1, 2])
def test_conv2d_dual_epilogue(backend_name, shortcut_stride):
    """Bottleneck end with projection shortcut: relu(bn3(conv3(y)) + bn_d(conv_d(x))), both BNs
    folded, vs the unfused PyTorch modules in eval mode."""
    n, c_mid, c_in, c_out, hw = 2, 16, 32, 48, 8
    conv3 = torch.nn.Conv2d(c_mid, c_out, 1, bias=False)
    conv_d = torch.nn.Conv2d(c_in, c_out, 1, stride=shortcut_stride, bias=False)
    bn3, bn_d = torch.nn.BatchNorm2d(c_out), torch.nn.BatchNorm2d(c_out)
    for bn in (bn3, bn_d):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 1.5)
        bn.eval()
    y = torch.randn(n, c_mid, hw // shortcut_stride, hw // shortcut_stride).contiguous(
        memory_format=torch.channels_last)
    x = torch.randn(n, c_in, hw, hw).contiguous(memory_format=torch.channels_last)
    w3, b3 = fold.fold_conv_bn(conv3.weight, None, *fold.bn_eval_scale_shift(bn3))
    wd, bd = fold.fold_conv_bn(conv_d.weight, None, *fold.bn_eval_scale_shift(bn_d))
    with backend.use(backend_name), torch.no_grad():
        out = ops.conv2d_dual_epilogue(y, w3, [1, 1], [0, 0], x, wd, shortcut_stride, b3 + bd,
                                       True)
        ref = torch.relu(bn3(conv3(y)) + bn_d(conv_d(x)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("cfg", CONVS[:5], ids=_ids)
def test_folded_conv_bn_relu_matches_eval_modules(backend_name, cfg):
    x, w, stride, padding, dilation, groups = _args(cfg, torch.float32)
    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride[0], padding[0],
                           bias=False)
    conv.weight.data.copy_(w)
    bn = torch.nn.BatchNorm2d(w.shape[0]).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 1.5)
    folded, shift = fold.fold_conv_bn(conv.weight, None, *fold.bn_eval_scale_shift(bn))
    with backend.use(backend_name), torch.no_grad():
        out = ops.conv2d_epilogue(x, folded, stride, padding, dilation, groups, None, shift,
                                  None, True)
        ref = torch.relu(bn(conv(x)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("cfg", CONVS, ids=_ids)
def test_training_chain_matches_pytorch(backend_name, cfg):
    """conv2d_bn_stats (statistics in the conv epilogue) -> batch_norm_add_relu with those
    statistics, forward and backward and running stats, vs conv -> BN -> add -> ReLU."""
    x, w, stride, padding, dilation, groups = _args(cfg, torch.float32)
    cout = w.shape[0]
    bn = torch.nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    bn_ref = copy.deepcopy(bn)
    z_shape = F.conv2d(x, w, None, stride, padding, dilation, groups).shape
    residual = torch.randn(z_shape)
    grad_out = torch.randn(z_shape)

    def fused(x, w, r):
        z, mean, var = ops.conv2d_bn_stats(x, w, stride, padding, dilation, groups)
        return fr.functional.batch_norm_add_relu(
            z, r, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True,
            num_batches_tracked=bn.num_batches_tracked, batch_mean=mean, batch_var=var)

    def reference(x, w, r):
        return torch.relu(bn_ref(F.conv2d(x, w, None, stride, padding, dilation, groups)) + r)

    results = []
    for fn, module in ((fused, bn), (reference, bn_ref)):
        xs, ws, rs = (t.detach().clone().requires_grad_() for t in (x, w, residual))
        with backend.use(backend_name):
            out = fn(xs, ws, rs)
        grads = torch.autograd.grad(out, [xs, ws, rs, module.weight, module.bias], grad_out)
        results.append((out, grads))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
def test_opcheck_conv_ops(backend_name):
    x, w, stride, padding, dilation, groups = _args(CONVS[2], torch.float32)
    scale, bias = torch.rand(w.shape[0]) + 0.5, torch.randn(w.shape[0])
    residual = torch.randn(1, 40, 7, 7).contiguous(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    with backend.use(backend_name):
        torch.library.opcheck(ops.conv2d_epilogue.default,
                              (x, w, stride, padding, dilation, groups, scale, bias, residual,
                               True))
        torch.library.opcheck(ops.conv2d_bn_stats.default,
                              (xg, wg, stride, padding, dilation, groups))
        y = torch.randn(1, 16, 7, 7).contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(ops.conv2d_dual_epilogue.default,
                              (x, w, [1, 1], [1, 1], y, torch.randn(40, 16, 1, 1), 1, bias, True))


def test_torch_compile_fullgraph_training_chain():
    x, w, stride, padding, dilation, groups = _args(CONVS[2], torch.float32)
    bn_w, bn_b = torch.rand(40).requires_grad_(), torch.randn(40).requires_grad_()

    def step(x, w):
        z, mean, var = ops.conv2d_bn_stats(x, w, stride, padding, dilation, groups)
        out = fr.functional.batch_norm_add_relu(z, None, None, None, bn_w, bn_b, training=True,
                                                batch_mean=mean, batch_var=var)
        return out.square().sum()

    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    eager = step(xs, ws)
    eager_grads = torch.autograd.grad(eager, [xs, ws])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(xs, ws)
    compiled_grads = torch.autograd.grad(compiled, [xs, ws])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_conv_path_choices():
    x, w, stride, padding, dilation, groups = _args(CONVS[2], torch.float32)
    assert conv_ops.triton_unsupported(x, w, stride, padding, dilation, groups) is None
    assert conv_ops.triton_unsupported(x, w, stride, padding, [2, 2], groups) == "dilation"
    assert conv_ops.triton_unsupported(x, w, stride, padding, dilation, 2) == \
        "grouped convolution"
    with backend.use("cpp"):  # CPU auto/cpp: the library conv + C++ epilogue, deterministic
        assert conv_ops.conv_path(x, w, stride, padding, dilation, groups) == "library"
    if backend.why_not("triton", "cpu") is None:
        with backend.use("triton"):
            assert conv_ops.conv_path(x, w, stride, padding, dilation, groups) == "triton"
            assert conv_ops.conv_path(x, w, stride, padding, dilation, 4) == "library"


def test_batch_stats_arguments_checked():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="given together"):
        fr.functional.batch_norm_add_relu(x, None, None, None, training=True,
                                          batch_mean=torch.zeros(4))
    with pytest.raises(ValueError, match="eval mode uses the running statistics"):
        fr.functional.batch_norm_add_relu(x, None, torch.zeros(4), torch.ones(4),
                                          training=False, batch_mean=torch.zeros(4),
                                          batch_var=torch.ones(4))


def test_tuned_choice_measures_once_and_caches(monkeypatch):
    monkeypatch.setattr(tuning, "_cache", {})
    calls = []

    def timer(fn):
        calls.append(fn)
        return fn()

    candidates = {"triton": lambda: 2.0, "library": lambda: 1.0}
    assert tuning.tuned_choice("key", candidates, timer) == "library"
    assert tuning.tuned_choice("key", candidates, timer) == "library"
    assert len(calls) == 2  # each candidate timed once, then the cached answer
    candidates = {"triton": lambda: 0.5, "library": lambda: 1.0}
    assert tuning.tuned_choice("other", candidates, timer) == "triton"


# ---- GPU (skipped without one): every ResNet-50 conv shape at batch 32 ------------------------
RESNET50_CONVS = [  # (C_in, C_out, kernel, stride, padding, input H=W)
    (3, 64, 7, 2, 3, 224),
    (64, 64, 1, 1, 0, 56), (64, 64, 3, 1, 1, 56), (64, 256, 1, 1, 0, 56), (256, 64, 1, 1, 0, 56),
    (256, 128, 1, 1, 0, 56), (128, 128, 3, 2, 1, 56), (128, 512, 1, 1, 0, 28),
    (512, 128, 1, 1, 0, 28), (128, 128, 3, 1, 1, 28),
    (512, 256, 1, 1, 0, 28), (256, 256, 3, 2, 1, 28), (256, 1024, 1, 1, 0, 14),
    (1024, 256, 1, 1, 0, 14), (256, 256, 3, 1, 1, 14),
    (1024, 512, 1, 1, 0, 14), (512, 512, 3, 2, 1, 14), (512, 2048, 1, 1, 0, 7),
    (2048, 512, 1, 1, 0, 7), (512, 512, 3, 1, 1, 7),
    (64, 256, 1, 1, 0, 56), (256, 512, 1, 2, 0, 56), (512, 1024, 1, 2, 0, 28),
    (1024, 2048, 1, 2, 0, 14),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend_name", ["triton", "cpp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", RESNET50_CONVS, ids=lambda s: "-".join(map(str, s)))
def test_resnet50_convs_cuda(backend_name, dtype, shape):
    if backend.why_not(backend_name, "cuda") is not None:
        pytest.skip(backend.why_not(backend_name, "cuda"))
    cin, cout, k, s, p, hw = shape
    x = torch.randn(32, cin, hw, hw, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype)
    scale = torch.rand(cout, device="cuda") + 0.5
    bias = torch.randn(cout, device="cuda")
    oh = (hw + 2 * p - k) // s + 1
    residual = torch.randn(32, cout, oh, oh, device="cuda").to(dtype).contiguous(
        memory_format=torch.channels_last)
    with backend.use(backend_name):
        out = ops.conv2d_epilogue(x, w, [s, s], [p, p], [1, 1], 1, scale, bias, residual, True)

    def reference(dt):
        z = F.conv2d(x.to(dt), w.to(dt), None, s, p)
        return conv_epilogue(z, scale, bias, residual.to(dt), True)

    # the same-dtype baseline: cuDNN in that dtype (fp32 accumulate), epilogue in fp32
    torch_same = conv_epilogue(F.conv2d(x, w, None, s, p).float(), scale, bias,
                               residual.float(), True).to(dtype)
    c = compare("conv2d_epilogue", out, reference(torch.float64), torch_same)
    assert c.ok, c


@pytest.fixture
def tf32_setting():
    """Sets whether cuDNN's fp32 convs (and so the Triton conv) may use TF32; restored after."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    yield lambda allowed: setattr(conv, "fp32_precision", "tf32" if allowed else "ieee")
    conv.fp32_precision = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9")
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
@pytest.mark.parametrize("shape", [RESNET50_CONVS[2], RESNET50_CONVS[7], RESNET50_CONVS[0]],
                         ids=lambda s: "-".join(map(str, s)))
def test_fp32_triton_conv_within_cudnn_error(tf32_setting, tf32, shape):
    """fp32 with TF32 allowed (PyTorch's default for cuDNN convs) and not: the Triton conv's
    error is within 2x cuDNN's own in the same mode (its TF32 truncates operands where cuDNN
    rounds them, so it runs three TF32 passes instead of one)."""
    if backend.why_not("triton", "cuda") is not None:
        pytest.skip(backend.why_not("triton", "cuda"))
    tf32_setting(tf32)
    assert conv_ops.allows_tf32() == tf32
    cin, cout, k, s, p, hw = shape
    x = torch.randn(8, cin, hw, hw, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5
    bias = torch.randn(cout, device="cuda")
    with backend.use("triton"), conv_ops.use_path("triton"):
        out = ops.conv2d_epilogue(x, w, [s, s], [p, p], [1, 1], 1, None, bias, None, False)
    ref64 = F.conv2d(x.double(), w.double(), bias.double(), s, p)
    cudnn = F.conv2d(x, w, bias, s, p)
    c = compare("fp32 conv", out, ref64, cudnn)
    assert c.ok, c


def test_torch_compile_inductor_conv_epilogue():
    x, w, stride, padding, dilation, groups = _args(CONVS[3], torch.float32)
    scale, bias = torch.rand(w.shape[0]) + 0.5, torch.randn(w.shape[0])

    def f(x):
        y = ops.conv2d_epilogue(x, w, stride, padding, dilation, groups, scale, bias, None, True)
        return y * 2 + 1  # something for inductor to fuse around the custom op

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend_name", ["triton", "cpp"])
@pytest.mark.parametrize("cfg", CONVS, ids=_ids)
def test_training_chain_cuda(backend_name, cfg):
    """conv2d_bn_stats -> batch_norm_add_relu on CUDA in bf16 vs conv -> BN -> add -> ReLU."""
    if backend.why_not(backend_name, "cuda") is not None:
        pytest.skip(backend.why_not(backend_name, "cuda"))
    x, w, stride, padding, dilation, groups = _args(cfg, torch.bfloat16)
    x, w = x.cuda(), w.cuda()
    bn = torch.nn.BatchNorm2d(w.shape[0]).cuda()
    bn_ref = copy.deepcopy(bn)
    with backend.use(backend_name), torch.no_grad():
        z, mean, var = ops.conv2d_bn_stats(x, w, stride, padding, dilation, groups)
        out = fr.functional.batch_norm_add_relu(z, None, bn.running_mean, bn.running_var,
                                                bn.weight, bn.bias, training=True,
                                                batch_mean=mean, batch_var=var)
        ref = torch.relu(bn_ref(F.conv2d(x.float(), w.float(), None, stride, padding, dilation,
                                         groups)))
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("cfg", CONVS[:5] + CONVS[6:], ids=_ids)
def test_conv2d_epilogue_gradients(backend_name, cfg):
    """Frozen-BN fine-tuning: gradients of input, weight, scale, bias and residual through
    conv2d_epilogue vs the same computation in plain PyTorch autograd."""
    x, w, stride, padding, dilation, groups = _args(cfg, torch.float32)
    cout = w.shape[0]
    z_shape = F.conv2d(x, w, None, stride, padding, dilation, groups).shape
    leaves = [t.detach().clone().requires_grad_() for t in
              (x, w, torch.rand(cout) + 0.5, torch.randn(cout), torch.randn(z_shape))]
    grad_out = torch.randn(z_shape)

    def fused(x, w, scale, bias, residual):
        return ops.conv2d_epilogue(x, w, stride, padding, dilation, groups, scale, bias,
                                   residual, True)

    def reference(x, w, scale, bias, residual):
        z = F.conv2d(x, w, None, stride, padding, dilation, groups)
        return conv_epilogue(z, scale, bias, residual, True)

    with backend.use(backend_name):
        got = torch.autograd.grad(fused(*leaves), leaves, grad_out)
    want = torch.autograd.grad(reference(*leaves), leaves, grad_out)
    for name, g, r in zip(["input", "weight", "scale", "bias", "residual"], got, want):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")
    with backend.use(backend_name):
        torch.library.opcheck(ops.conv2d_epilogue.default,
                              (leaves[0], leaves[1], stride, padding, dilation, groups,
                               leaves[2], leaves[3], leaves[4], True))


def test_measured_choice_leaves_out_a_disagreeing_candidate():
    """Before a choice is measured, each candidate's output is compared with the library
    path's: a fast but wrong kernel is left out (with a warning naming it), a NaN one too."""
    reference = torch.randn(4, 8, 5, 5)
    candidates = {
        "library": lambda: (reference, reference.mean()),
        "triton": lambda: (reference * (1 + 1e-3), reference.mean()),  # rounding-sized
        "cutlass": lambda: (reference.flip(0), reference.mean()),  # wrong layout
    }
    with pytest.warns(RuntimeWarning, match="cutlass path disagrees"):
        kept = conv_ops.agreeing("bn_stats", "key-a", candidates)
    assert sorted(kept) == ["library", "triton"]
    candidates["cutlass"] = lambda: (reference * float("nan"), reference.mean())
    with pytest.warns(RuntimeWarning, match="cutlass"):
        assert "cutlass" not in conv_ops.agreeing("bn_stats", "key-b", candidates)
    # NaN in the data (both paths carry it to the same places) is no reason to distrust one
    with_nan = reference.clone()
    with_nan[0, 0, 0, 0] = float("nan")
    nan_candidates = {"library": lambda: with_nan, "triton": lambda: with_nan * (1 + 1e-3)}
    assert "triton" in conv_ops.agreeing("epilogue", "key-nan", nan_candidates)

    def broken():
        raise RuntimeError("out of shared memory")

    candidates["cutlass"] = broken
    with pytest.warns(RuntimeWarning, match="cutlass path failed"):
        assert "cutlass" not in conv_ops.agreeing("bn_stats", "key-c", candidates)


class _CudaLike:
    """Stands for a CUDA tensor in the path-trust logic (which looks at the device only)."""
    device = torch.device("cuda", 0)
    is_cuda = False  # devices.on_device: nothing to switch
    shape = (2, 8, 5, 5)


@pytest.fixture
def measurable(monkeypatch):
    monkeypatch.setattr(conv_ops, "_agreed", {})
    monkeypatch.setattr(conv_ops.tuning, "can_measure", lambda: True)


def test_remembered_or_forced_path_is_checked_once(measurable):
    """A path chosen without a measurement in this process (remembered on disk, or a forced
    backend's CUTLASS conv) is compared with the library conv once per shape before it is
    used; a wrong one gives way to the library conv with a warning."""
    reference = torch.randn(2, 8, 5, 5)
    runs = {"library": 0, "triton": 0}

    def counted(name, value):
        def run():
            runs[name] += 1
            return value
        return run

    good = {"library": counted("library", reference), "triton": counted("triton", reference)}
    assert conv_ops.trusted("epilogue", "k1", "triton", good, _CudaLike()) == "triton"
    assert conv_ops.trusted("epilogue", "k1", "triton", good, _CudaLike()) == "triton"
    assert runs == {"library": 1, "triton": 1}  # checked once, then trusted
    wrong = {"library": lambda: reference, "cutlass": lambda: reference + 1.0}
    with pytest.warns(RuntimeWarning, match="cutlass path disagrees"):
        assert conv_ops.trusted("epilogue", "k2", "cutlass", wrong, _CudaLike()) == "library"
    assert conv_ops.trusted("epilogue", "k2", "cutlass", wrong, _CudaLike()) == "library"
    with pytest.raises(RuntimeError, match="forced but its epilogue output disagrees"):
        conv_ops.trusted("epilogue", "k2", "cutlass", wrong, _CudaLike(), forced=True)


def test_unchecked_path_gives_way_during_graph_capture(monkeypatch):
    """While a CUDA graph is captured nothing can be compared: an unchecked path is not used."""
    monkeypatch.setattr(conv_ops, "_agreed", {})
    monkeypatch.setattr(conv_ops.tuning, "can_measure", lambda: False)
    candidates = {"library": lambda: torch.ones(1), "triton": lambda: torch.ones(1)}
    assert conv_ops.trusted("epilogue", "k", "triton", candidates, _CudaLike()) == "library"
    conv_ops._agreed[("k", "triton")] = True
    assert conv_ops.trusted("epilogue", "k", "triton", candidates, _CudaLike()) == "triton"
    # on the CPU (the interpreter, the C++ kernels) the path is what was asked for
    assert conv_ops.trusted("epilogue", "k", "triton", candidates, torch.ones(1)) == "triton"
