"""The registered ops behind batch_norm_add_relu: kernel-level pieces vs the reference on every
backend, opcheck on every op, gradcheck, torch.compile, memory saved for backward, bad input."""

import pytest
import torch
import torch.nn.functional as F

import fused_resnet as fr
from conftest import backend_params, cpu_backend_params, requires_cuda
from fused_resnet import backend, layout, reference, verify

ops = torch.ops.fused_resnet
PIECES = ["bn_stats", "bn_add_relu_apply", "bn_add_relu_grad_reduce", "bn_add_relu_grad_apply"]


def piece_inputs(shape=(2, 5, 3, 5), dtype=torch.float32, channels_last=False, relu=True,
                 save_mask=True):
    """Arguments of each kernel-level piece (numel 150: not a multiple of 8)."""
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    r = torch.randn_like(x)
    grad = torch.randn_like(x)
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    mean, var = torch.randn(c) * 0.1, torch.rand(c) + 0.5
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    k, b, cc = torch.rand(c), torch.randn(c) * 0.1, torch.randn(c) * 0.1
    _, mask = reference.bn_add_relu_apply(x, r, scale, shift, relu, True)
    return {
        "bn_stats": (x, weight, bias, 1e-5),
        "bn_add_relu_apply": (x, r, scale, shift, relu, save_mask),
        "bn_add_relu_grad_reduce": (grad, mask, x, mean, var, weight, 1e-5, relu, True),
        "bn_add_relu_grad_apply": (grad, mask, x, mean, k, b, cc, relu, True),
    }


def backend_op(piece, backend_name):
    return getattr(ops, piece if backend_name == "torch" else f"{piece}_{backend_name}").default


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("save_mask", [True, False], ids=["mask", "nomask"])
def test_piece_matches_reference(backend_name, piece, channels_last, relu, dtype, save_mask):
    """Each kernel piece vs reference.<piece>: masks bit-exact, values within fp32 rounding of
    the same computation (plus one rounding of the storage dtype)."""
    if piece != "bn_add_relu_apply" and not save_mask:
        pytest.skip("save_mask only applies to bn_add_relu_apply")
    args = piece_inputs(dtype=dtype, channels_last=channels_last, relu=relu,
                        save_mask=save_mask)[piece]
    with backend.use(backend_name):
        got = getattr(ops, piece)(*args)
    want = getattr(reference, piece)(*args)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
        if g.dtype == torch.uint8:
            assert torch.equal(g, w), "packed ReLU mask differs"
        else:
            eps = torch.finfo(g.dtype).eps
            torch.testing.assert_close(g.double(), w.double(), rtol=4 * eps, atol=1e-5)


@pytest.mark.skipif(backend.why_not("cpp", "cpu") is not None, reason="fused_resnet._C is not built")
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("centred", [True, False], ids=["mean", "nomean"])
def test_channel_tiles_match_reference(relu, residual, centred):
    """fp32 channels_last with C a multiple of 16 takes the C++ kernels' tiled loops (16 channels
    per vector, the ReLU mask read and written as bits): every piece and variant against the
    reference, on 11552 rows of 48 channels (several parallel tasks and reduction chunks, the
    last ones partial, and mask bytes that cross tile boundaries)."""
    torch.manual_seed(0)
    shape = (8, 48, 38, 38)
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if residual else None
    grad = torch.randn_like(x)
    c = shape[1]
    scale, shift, mean = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c) if centred else None
    var, weight = torch.rand(c) + 0.5, torch.rand(c) + 0.5
    k, b, cc = torch.rand(c), torch.randn(c) * 0.1, torch.randn(c) * 0.1
    calls = [
        ("bn_stats", (x, weight, shift, 1e-5)),
        ("bn_add_relu_apply", (x, r, scale, shift, relu, True, mean)),
        ("bn_add_relu_apply", (x, r, scale, shift, relu, False, mean)),
    ]
    _, mask = reference.bn_add_relu_apply(x, r, scale, shift, relu, True, mean)
    stat_mean = mean if centred else torch.randn(c)
    calls += [
        ("bn_add_relu_grad_reduce", (grad, mask, x, stat_mean, var, weight, 1e-5, relu, True)),
        ("bn_add_relu_grad_apply", (grad, mask, x, stat_mean, k, b, cc, relu, residual)),
    ]
    for piece, args in calls:
        got = getattr(ops, f"{piece}_cpp")(*args)
        want = getattr(reference, piece)(*args)
        # the reference in float64 on the same (fp32) values; a reduction over 11552 values per
        # channel is then held to verify's criterion: 2x the fp32 reference's error + 4 roundings
        want64 = getattr(reference, piece)(*(a.double() if isinstance(a, torch.Tensor) and
                                             a.is_floating_point() else a for a in args))
        for i, (g, w, w64) in enumerate(zip(got, want, want64)):
            assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
            if g.dtype == torch.uint8:
                assert torch.equal(g, w), f"{piece}: packed ReLU mask differs"
            else:
                result = verify.compare(f"{piece}[{i}]", g, w64, w)
                assert result.ok, result


def test_mask_is_one_bit_per_element():
    x = torch.randn(3, 5, 7, 3)  # 315 elements -> 40 bytes
    out, mask = ops.bn_add_relu_apply(x, None, torch.ones(5), torch.zeros(5), True, True)
    assert mask.dtype == torch.uint8 and mask.numel() == 40
    assert torch.equal(reference.relu_mask(mask, x), x > 0)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
def test_inference_writes_no_mask(backend_name):
    """Under no_grad (or with nothing requiring grad) no ReLU mask is written at all."""
    x = torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    with backend.use(backend_name), torch.no_grad():
        out, mask, _, _ = ops.bn_add_relu(x, None, None, None, rm, rv, False, 1e-5, True, False)
    assert mask.numel() == 0
    torch.testing.assert_close(out, torch.relu(F.batch_norm(x, rm, rv)))


def test_backward_without_saved_mask_is_refused():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="backward needs the ReLU mask"):
        ops.bn_add_relu(x, None, None, None, None, None, True, 1e-5, True, False)


def test_backward_saves_input_and_bit_mask_only():
    """No activation is kept for the ReLU: what autograd saves is the input, a 1-bit mask and
    per-channel vectors (the residual and the output are not saved)."""
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    r = torch.randn(4, 16, 8, 8, requires_grad=True)
    w = torch.rand(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fr.functional.batch_norm_add_relu(x, r, None, None, w, b, training=True)
    big = [t for t in saved if t.numel() > 16]
    assert len(big) == 2, [tuple(t.shape) for t in saved]
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in big)
    mask = [t for t in big if t.dtype == torch.uint8]
    assert len(mask) == 1 and mask[0].numel() == x.numel() // 8
    assert all(t.data_ptr() != out.data_ptr() and t.data_ptr() != r.data_ptr() for t in saved)


# ---- opcheck on every registered op -------------------------------------------------------------
@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("piece", PIECES)
def test_opcheck_pieces(backend_name, piece):
    args = piece_inputs(channels_last=True)[piece]
    # The Triton pieces are triton_ops: AOT dispatch traces into their launches, which the CPU
    # interpreter cannot trace (its kernels read data pointers). On a GPU every check runs
    # (test_opcheck_pieces_cuda); test_compile_visible.py traces them on fake CUDA tensors.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if backend_name != "triton":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(backend_op(piece, backend_name), args, test_utils=utils)
    with backend.use(backend_name):  # the dispatching op, routed to this backend
        torch.library.opcheck(getattr(ops, piece).default, args)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_opcheck_bn_add_relu(backend_name, training, residual):
    x = torch.randn(2, 4, 3, 3, requires_grad=True).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 4, 3, 3, requires_grad=True) if residual else None
    w = torch.rand(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    with backend.use(backend_name):
        torch.library.opcheck(ops.bn_add_relu.default,
                              (x, r, w, b, rm, rv, training, 1e-5, True, True))
        _, mask, mean, var = ops.bn_add_relu(x, r, w, b, rm, rv, training, 1e-5, True, True)
        grad = torch.randn(2, 4, 3, 3)
        torch.library.opcheck(ops.bn_add_relu_backward.default,
                              (grad, x.detach(), mask, mean, var, w.detach(), training, 1e-5,
                               True, residual, True))


# ---- autograd ------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_gradcheck_float64(training, relu):
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)

    def f(x, r, w, b):
        return fr.functional.batch_norm_add_relu(x, r, rm.clone(), rv.clone(), w, b,
                                                 training=training, relu=relu)

    assert torch.autograd.gradcheck(f, (x, r, w, b))


def test_float64_rejected_by_kernel_backends():
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    with backend.use("cpp"), pytest.raises(RuntimeError, match="float64"):
        fr.functional.batch_norm_add_relu(x, None, None, None, training=True)


def test_autocast_promotes_like_pytorch():
    """Under autocast, bf16 conv output + fp32 residual: PyTorch's add type-promotes to fp32;
    the fused op gives the same dtype and values."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    bn = torch.nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 3, 6, 6)
    residual = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = conv(x)
        ref = torch.relu(bn(z) + residual)
        out = fr.functional.batch_norm_add_relu(z, residual, bn.running_mean, bn.running_var,
                                                bn.weight, bn.bias, training=False)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- torch.compile -------------------------------------------------------------------------------
def _train_step(x, r, w, b, rm, rv, nbt):
    out = fr.functional.batch_norm_add_relu(x, r, rm, rv, w, b, training=True, momentum=None,
                                            num_batches_tracked=nbt)
    return out.square().sum()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    """Forward, backward and the in-place running-stat update inside one compiled graph."""
    def args():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
        r = torch.randn(2, 4, 5, 5, generator=g)
        w = torch.rand(4, generator=g).requires_grad_()
        b = torch.randn(4, generator=g).requires_grad_()
        x.requires_grad_()
        return x, r, w, b, torch.zeros(4), torch.ones(4), torch.tensor(0)

    eager, compiled = args(), args()
    loss_e = _train_step(*eager)
    loss_e.backward()
    step = torch.compile(_train_step, fullgraph=True, backend=compile_backend)
    loss_c = step(*compiled)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)  # running stats and num_batches_tracked updated
        if e.grad is not None:
            torch.testing.assert_close(c.grad, e.grad)


# ---- bad input: a clear error, raised before any kernel runs ------------------------------------
def _bn_args(c=4):
    return dict(running_mean=torch.zeros(c), running_var=torch.ones(c), weight=torch.ones(c),
                bias=torch.zeros(c))


@pytest.mark.parametrize("call, error, message", [
    (lambda: fr.functional.batch_norm_add_relu(torch.randn(2, 4, 5), None, **_bn_args()),
     ValueError, "must be 4-D"),
    (lambda: fr.functional.batch_norm_add_relu(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2),
                                               **_bn_args()),
     ValueError, "residual has shape"),
    (lambda: fr.functional.batch_norm_add_relu(torch.randn(2, 4, 3, 3),
                                               torch.randn(2, 4, 3, 3).half(), **_bn_args()),
     TypeError, "residual has dtype"),
    (lambda: fr.functional.batch_norm_add_relu(torch.randn(2, 4, 3, 3),
                                               torch.empty(2, 4, 3, 3, device="meta"),
                                               **_bn_args()),
     ValueError, "residual is on meta"),
    (lambda: fr.functional.batch_norm_add_relu(torch.randn(2, 4, 3, 3), None,
                                               **{**_bn_args(), "weight": torch.ones(5)}),
     ValueError, r"weight must have shape \(4,\)"),
    (lambda: fr.functional.batch_norm_add_relu(torch.randn(2, 4, 3, 3), None,
                                               **{**_bn_args(), "running_var": torch.ones(3)}),
     ValueError, r"running_var must have shape \(4,\)"),
    (lambda: fr.functional.batch_norm_add_relu(torch.randint(0, 5, (2, 4, 3, 3)), None,
                                               **_bn_args()),
     TypeError, "unsupported input dtype torch.int64"),
    (lambda: fr.functional.batch_norm_add_relu(torch.randn(2, 4, 3, 3), None, None, None),
     RuntimeError, "running_mean must be defined in evaluation mode"),
    (lambda: fr.functional.batch_norm_add_relu(torch.randn(2, 4, 3, 3), None, momentum=None,
                                               training=True, **_bn_args()),
     ValueError, "needs num_batches_tracked"),
    (lambda: backend.normalize("cudnn"), ValueError, "unknown backend 'cudnn'"),
], ids=["3d", "residual_shape", "residual_dtype", "residual_device", "weight_channels",
        "running_var_channels", "int_dtype", "eval_without_stats", "momentum_none", "backend"])
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_one_value_per_channel_same_error_as_pytorch():
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError) as ours:
        fr.functional.batch_norm_add_relu(x, None, training=True, **_bn_args())
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.skipif(backend.why_not("cpp", "cpu") is not None, reason="C++ extension not built")
@pytest.mark.parametrize("call, message", [
    (lambda: ops.bn_add_relu_apply_cpp(torch.randn(2, 4, 3, 3), None, torch.ones(3),
                                       torch.zeros(4), True, True),
     r"scale must have shape \(4,\)"),
    (lambda: ops.bn_add_relu_apply_cpp(torch.randn(2, 4, 3, 3), None, torch.ones(4).double(),
                                       torch.zeros(4), True, True), "scale must be float32"),
    (lambda: ops.bn_stats_cpp(torch.randn(2, 4, 3, 3).double(), None, None, 1e-5),
     "unsupported dtype"),
    (lambda: ops.bn_stats_cpp(torch.randn(4, 3, 3), None, None, 1e-5), "must be 4-D"),
    (lambda: ops.bn_stats_cpp(torch.randn(2, 4, 3, 3), torch.ones(5), None, 1e-5),
     r"weight must have shape \(4,\)"),
    (lambda: ops.bn_add_relu_grad_apply_cpp(
        torch.randn(2, 4, 3, 3), torch.zeros(3, dtype=torch.uint8), torch.randn(2, 4, 3, 3),
        *[torch.zeros(4)] * 4, True, False), "mask must be a uint8 tensor of 9 bytes"),
])
def test_cpp_ops_check_their_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_layout_rule_matches_mask_order():
    """The bit order of the mask follows layout.kernel_format: memory order of NHWC input."""
    x = torch.randn(1, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    _, mask = ops.bn_add_relu_apply(x, None, torch.ones(3), torch.zeros(3), True, True)
    bits = reference.unpack_bits(mask, x.numel())
    assert torch.equal(bits, layout.memory_order(x > 0, x))


@pytest.fixture
def small_triton_tiles(monkeypatch):
    """Tiny Triton reduction tiles and several splits, so that the interpreter (which otherwise
    covers a small test tensor with one big tile) runs the tile-merge and split-merge paths."""
    if backend.why_not("triton", "cpu") is not None:
        return
    from fused_resnet.kernels import bn_act

    monkeypatch.setattr(bn_act, "_reduce_tiles",
                        lambda x: (8, 4, 1) if layout.is_channels_last(x) else (2, 1, 16))
    monkeypatch.setattr(bn_act, "_reduce_splits", lambda units, tiles, interp: 5)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_reductions_merge_partials(backend_name, channels_last, small_triton_tiles):
    """Per-channel statistics and gradient sums over many chunks/tiles/splits, on data with a
    large mean (where a wrong merge formula or E[x^2]-E[x]^2 would show), vs float64."""
    x = (torch.randn(3, 5, 20, 21) * 0.5 + 4.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # 1260 rows: several CPU chunks
    grad = torch.randn_like(x)
    _, mask = reference.bn_add_relu_apply(x, None, torch.ones(5), torch.full((5,), -4.0), True,
                                          True)
    with backend.use(backend_name):
        mean, var, _, _ = ops.bn_stats(x, None, None, 0.0)
        _, _, _, grad_weight, grad_bias = ops.bn_add_relu_grad_reduce(grad, mask, x, mean, var,
                                                                      None, 0.0, True, True)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-7)
    dz = grad.double() * (x.double() > 4.0)
    # grad_bias = sum(dz); grad_weight = sum(dz*(x - mean)) / sqrt(var + eps), eps = 0 here
    torch.testing.assert_close(grad_bias.double(), dz.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    sum_dz_xmu = (dz * (x.double() - mean.double().view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
    torch.testing.assert_close(grad_weight.double(), sum_dz_xmu / var64.sqrt(), rtol=1e-5,
                               atol=1e-4)



@pytest.mark.skipif(backend.why_not("cpp", "cpu") is not None, reason="fused_resnet._C is not built")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels", [5, 32], ids=["c5", "c32-tiles"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_grad_apply_into_grad_is_the_grad_apply(channels_last, dtype, channels, relu):
    """The CPU training step's in-place gradient apply (bn_add_relu_grad_apply_into_grad_cpp):
    bitwise grad_apply's input gradient, written over `grad` and returned (same storage, same
    strides); a grad not dense in the input's layout is refused, not copied."""
    torch.manual_seed(0)
    args = piece_inputs((3, channels, 7, 9), dtype, channels_last,
                        relu)["bn_add_relu_grad_apply"]
    grad, mask, x, mean, k, b, c, relu, _ = args
    want, _ = ops.bn_add_relu_grad_apply_cpp(grad, mask, x, mean, k, b, c, relu, False)
    buffer = grad.clone(memory_format=layout.kernel_format(x))
    got = ops.bn_add_relu_grad_apply_into_grad_cpp(buffer, mask, x, mean, k, b, c, relu)
    assert got.data_ptr() == buffer.data_ptr() and buffer.stride() == want.stride()
    assert torch.equal(buffer, want)
    other = torch.contiguous_format if channels_last else torch.channels_last
    with pytest.raises(RuntimeError, match="dense in the input's memory format"):
        ops.bn_add_relu_grad_apply_into_grad_cpp(grad.contiguous(memory_format=other), mask, x,
                                                 mean, k, b, c, relu)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 3, 70, 70)], ids=["planes49", "planes4900"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nchw_gradient_sums_vs_float64(backend_name, shape, relu, dtype):
    """NCHW gradient sums (the C++ kernels sum a plane's elements in rows of 16 lanes): planes
    that end mid-row and start mid mask byte (49 elements), and planes longer than one reduction
    run (4900: several blocks, a partial one); without a ReLU no mask at all, as the model
    passes it; vs the float64 sums of the same values."""
    torch.manual_seed(0)
    x = (torch.randn(shape) * 0.5 + 2.0).to(dtype)
    grad = torch.randn(shape).to(dtype)
    c = shape[1]
    mean = x.double().mean(dim=(0, 2, 3)).float()
    var = x.double().var(dim=(0, 2, 3), correction=0).float()
    mask = (reference.bn_add_relu_apply(x, None, torch.ones(c), torch.full((c,), -2.0), True,
                                        True)[1] if relu else layout.empty_mask(x, False))
    with backend.use(backend_name):
        _, _, _, grad_weight, grad_bias = ops.bn_add_relu_grad_reduce(grad, mask, x, mean, var,
                                                                      None, 0.0, relu, True)
    dz = grad.double() * (x.double() > 2.0) if relu else grad.double()
    xmu = x.double() - mean.double().view(1, -1, 1, 1)
    # grad_bias = sum(dz); grad_weight = sum(dz*(x - mean)) / sqrt(var + eps), eps = 0 here:
    # fp32 sums of ~10^4 terms in blocks of 16 into double totals: ~1e-6 relative
    torch.testing.assert_close(grad_bias.double(), dz.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_weight.double(),
                               (dz * xmu).sum(dim=(0, 2, 3)) / var.double().sqrt(), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("channels", [5, 32], ids=["c5", "c32-tiles"])
def test_reductions_of_an_empty_batch(backend_name, channels_last, channels):
    """No rows at all (an empty batch): every channel's statistics are NaN, as torch.var_mean
    gives, and the gradient sums are those of nothing, as the reference computes; no crash
    (an empty NHWC reduction once divided by its zero chunk count)."""
    x = torch.randn(0, channels, 3, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    mask = reference.bn_add_relu_apply(x, None, torch.ones(channels), torch.zeros(channels),
                                       True, True)[1]
    results = {}
    for name in (backend_name, "torch"):
        with backend.use(name):
            mean, var, _, _ = ops.bn_stats(x, None, None, 1e-5)
            results[name] = (mean, var) + ops.bn_add_relu_grad_reduce(
                grad, mask, x, torch.zeros(channels), torch.ones(channels), None, 1e-5, True,
                True)
    assert results[backend_name][0].isnan().all() and results[backend_name][1].isnan().all()
    for got, want in zip(results[backend_name], results["torch"]):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend_name", cpu_backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("channels", [5, 32], ids=["c5", "c32-tiles"])
def test_statistics_of_channels_with_an_infinity(backend_name, channels_last, channels):
    """A channel holding an inf gets a non-finite mean and a NaN variance, as torch.var_mean
    gives (its mean is +-inf there; merged partial means give NaN here, as the reference
    backend's do: either way BN's output for that channel is NaN, as PyTorch's), wherever the
    inf is: among the values the one-pass statistics centre their sums on (a plane's first
    value, a channels_last tensor's first rows) or after them; the other channels stay
    exact."""
    x = torch.randn(2, channels, 6, 6)
    x[0, 0, 0, 0] = float("inf")   # NCHW: channel 0's first value; NHWC: in its first row
    x[1, 1, 5, 5] = float("inf")   # the last value of channel 1
    x[0, 2, 0, 1], x[1, 2, 3, 3] = float("inf"), float("-inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with backend.use(backend_name):
        mean, var, _, _ = ops.bn_stats(x, None, None, 1e-5)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert not mean[:3].isfinite().any() and var[:3].isnan().all()
    torch.testing.assert_close(mean[3:], mean64[3:].float())  # fp32's tolerance
    torch.testing.assert_close(var[3:], var64[3:].float())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_of_no_channels(channels_last):
    """No channels: empty statistics, no crash (a channels_last reduction once divided its
    chunk size by the channel count)."""
    if backend.why_not("cpp", "cpu"):
        pytest.skip(backend.why_not("cpp", "cpu"))
    x = torch.randn(2, 0, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var, scale, shift = ops.bn_stats_cpp(x, None, None, 1e-5)
    assert mean.shape == var.shape == scale.shape == shift.shape == (0,)


# ---- the same registrations on a GPU (skipped without one) --------------------------------------
def _to_cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend_name", backend_params("cuda"))
@pytest.mark.parametrize("piece", PIECES)
def test_opcheck_pieces_cuda(backend_name, piece):
    args = _to_cuda(piece_inputs(dtype=torch.bfloat16, channels_last=True)[piece])
    torch.library.opcheck(backend_op(piece, backend_name), args)
    with backend.use(backend_name):
        torch.library.opcheck(getattr(ops, piece).default, args)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend_name", backend_params("cuda"))
def test_torch_compile_fullgraph_cuda(backend_name):
    x = torch.randn(4, 8, 6, 6, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    w = torch.rand(8, device="cuda", requires_grad=True)
    b = torch.randn(8, device="cuda", requires_grad=True)
    with backend.use(backend_name):
        eager = _train_step(x, r, w, b, torch.zeros(8, device="cuda"),
                            torch.ones(8, device="cuda"), torch.tensor(0, device="cuda"))
        compiled = torch.compile(_train_step, fullgraph=True)(
            x, r, w, b, torch.zeros(8, device="cuda"), torch.ones(8, device="cuda"),
            torch.tensor(0, device="cuda"))
    torch.testing.assert_close(compiled, eager)
