"""The CPU inference fast path (fused_resnet.ops.conv_mkldnn, the prepacked weights of
fused_resnet.modules.conv_bn_act and the donated stage tensors of fused_resnet.modules.stage):
results vs the unfused model and float64, cache invalidation, in-place safety, bf16, compile
and export, and that the path is really taken (else every other test here proves nothing)."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet as fr
from fused_resnet.modules import stage
from fused_resnet.modules.conv_bn_act import Bounds
from fused_resnet.ops import conv as conv_ops
from fused_resnet.ops import conv_mkldnn
from fused_resnet.verify import compare

pytestmark = pytest.mark.skipif(conv_mkldnn.unsupported(torch.ones(1, 1, 1, 1),
                                                        torch.ones(1, 1, 1, 1)) is not None,
                                reason="oneDNN fused convolutions are not usable here")

CL = torch.channels_last


def _model(name="resnet50", **kwargs):
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm
        model = timm.create_model(name[5:], pretrained=False, num_classes=10, **kwargs)
    else:
        model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    with torch.no_grad():  # non-trivial BN parameters and statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class _Spy:
    """Counts conv_mkldnn.conv2d_act calls (prepacked weights, writes into the residual)."""

    def __init__(self, monkeypatch):
        self.calls, self.prepacked, self.into_residual = 0, 0, []
        real = conv_mkldnn.conv2d_act

        def spy(input, weight, bias, stride, padding, dilation, groups, residual=None,
                relu=True, into_residual=False, bound=None):
            self.calls += 1
            self.prepacked += int(weight.is_mkldnn)
            if into_residual:
                self.into_residual.append(residual)
            return real(input, weight, bias, stride, padding, dilation, groups, residual, relu,
                        into_residual, bound)

        monkeypatch.setattr(conv_mkldnn, "conv2d_act", spy)


def _check(name, fused, plain, x):
    with torch.no_grad():
        got, want = fused(x), plain(x)
        ref = copy.deepcopy(plain).double()(x.double())
    c = compare(name, got, ref, want)
    assert c.ok, c
    return got


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "timm:resnet26",
                                  "timm:resnet50d"])
@pytest.mark.parametrize("memory_format", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_eval_matches_unfused_and_float64(name, memory_format, monkeypatch):
    model = _model(name).to(memory_format=memory_format)
    fused = fr.fuse_(copy.deepcopy(model))
    spy = _Spy(monkeypatch)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
    kept = x.clone()
    out = _check(name, fused, model, x)
    assert torch.equal(x, kept), "the caller's input was overwritten"
    assert spy.calls > 0, "the oneDNN path was not taken"
    if memory_format == CL:
        assert spy.prepacked == spy.calls, "a channels_last conv ran without prepacked weights"
    assert out.is_contiguous(memory_format=memory_format) or out.dim() == 2


@pytest.mark.parametrize("shortcut, plain", [("A", False), ("B", False), ("A", True)],
                         ids=["option_A", "option_B", "plain"])
def test_cifar_zoo(shortcut, plain, monkeypatch):
    """The CIFAR ResNets: option A's zero-padding shortcut (a module's output: never written
    into), option B's projections, and the plain network without shortcuts."""
    torch.manual_seed(0)
    model = fr.models.cifar_resnet(20, shortcut=shortcut, plain=plain)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    model = model.eval().to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    spy = _Spy(monkeypatch)
    _check(f"cifar {shortcut}", fused, model,
           torch.randn(4, 3, 32, 32).contiguous(memory_format=CL))
    assert spy.calls == 18 + (2 if shortcut == "B" and not plain else 0)  # stem: not fused
    # donated inputs: blocks 2-3 of each stage; B's two projections are written into as well
    assert len(spy.into_residual) == (0 if plain else 6 + (2 if shortcut == "B" else 0))


def test_resnet50_donates_between_blocks_and_into_its_projections(monkeypatch):
    """ResNet-50: the projection of each stage's first block and the input of every other block
    are written in place (16 blocks: 4 projections + 12 donated inputs)."""
    model = _model("resnet50").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    assert all(type(getattr(fused, f"layer{i}")) is stage.FusedSequential for i in range(1, 5))
    spy = _Spy(monkeypatch)
    _check("resnet50", fused, model, torch.randn(2, 3, 64, 64).contiguous(memory_format=CL))
    assert len(spy.into_residual) == 16


def _count_measured_maps(monkeypatch) -> list:
    """Records the shape of every feature map (4-D tensor) conv_mkldnn.max_abs measures: the
    NaN guard's passes over activations (per-channel shifts are 1-D)."""
    measured = []
    real = conv_mkldnn.max_abs

    def spy(t):
        if t is not None and t.dim() == 4:
            measured.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(conv_mkldnn, "max_abs", spy)
    return measured


@pytest.mark.parametrize("limit, measured_maps",
                         [(0.0, [17]), (float("inf"), [5]), (Bounds.HANDOVER_LIMIT, range(5, 17))],
                         ids=["never-taken", "always-taken", "default"])
def test_stage_hands_each_blocks_output_bound_to_the_next(monkeypatch, limit, measured_maps):
    """ResNet-50: with the previous block's output goes its bound, so a block measures its input
    (one pass) only where nobody handed a bound over: the stem's input and each stage's first
    block (1 + 4) when every handed bound is taken, every block's input as well (1 + 16) when
    none is; and only bounds under Bounds.HANDOVER_LIMIT are taken (default: some)."""
    model = _model("resnet50").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    _check("resnet50", fused, model, x)  # prepacks: the counts below are of a warm model
    monkeypatch.setattr(Bounds, "HANDOVER_LIMIT", limit)
    measured = _count_measured_maps(monkeypatch)
    _check("resnet50", fused, model, x)
    assert len(measured) in measured_maps, measured


def test_handed_over_bounds_keep_nan_and_inf(monkeypatch):
    """Every handed bound taken: a NaN or inf in an image still comes out where PyTorch's does
    (the stage's input is measured, and a non-finite bound is never taken), and so does an
    image that overflows inside the network."""
    monkeypatch.setattr(Bounds, "HANDOVER_LIMIT", float("inf"))
    model = _model("resnet50").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    x = torch.randn(3, 3, 64, 64)
    x[0, 1, 7, 9], x[1, 0, 3, 3] = float("nan"), float("inf")
    x[2] *= 3e37
    x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        got, want = fused(x), model(x)
    assert not want.isfinite().any(dim=1).all(), "the batch must give PyTorch non-finite images"
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())


def test_tensors_a_hook_or_the_caller_holds_are_never_overwritten(monkeypatch):
    model = _model("resnet18").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = (output, output.clone())
        return hook

    # a forward hook on a block: its output is the next block's input
    fused.layer1[0].register_forward_hook(keep("layer1.0"))
    # a global hook sees every module's output: while one is registered every block computes
    # through its original modules (so the hook sees each of them), and nothing is written in
    # place
    spy = _Spy(monkeypatch)
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: None)
    try:
        with pytest.warns(UserWarning, match="global module hooks"):
            _check("resnet18", fused, model, x)
        assert len(spy.into_residual) == 0
    finally:
        handle.remove()
    spy.into_residual.clear()
    _check("resnet18", fused, model, x)
    for name, (held, copy_) in seen.items():
        assert torch.equal(held, copy_), f"the output {name}'s hook holds was overwritten"
    # + the inputs of layer2-4's second blocks (layer1.1's input is layer1.0's hooked output)
    assert len(spy.into_residual) == 6
    # a block called directly, by a caller that keeps its input
    block = fused.layer1[1]
    y = torch.randn(2, 64, 16, 16).contiguous(memory_format=CL)
    y_kept = y.clone()
    with torch.no_grad():
        block(y)
    assert torch.equal(y, y_kept)


def test_pre_hook_on_the_receiving_block_keeps_its_input(monkeypatch):
    model = _model("resnet18").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    held = []
    fused.layer2[1].register_forward_pre_hook(lambda m, args: held.append((args[0],
                                                                           args[0].clone())))
    _check("resnet18", fused, model, torch.randn(2, 3, 64, 64).contiguous(memory_format=CL))
    assert torch.equal(*held[0])


def test_prepacked_weights_follow_optimizer_steps_and_load_state_dict():
    model = _model("resnet18").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    _check("before", fused, model, x)  # caches folded and prepacked weights
    fused.train()  # a training step changes weights and running statistics in place
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(torch.randn(4, 3, 64, 64).contiguous(memory_format=CL)).square().mean().backward()
    opt.step()
    fused.eval()
    model.load_state_dict(fused.state_dict())  # the unfused model with the same new state
    _check("after an optimizer step", fused, model, x)
    other = _model("resnet18")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    model.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    _check("after load_state_dict", fused, model, x)
    fused.double(), model.double()  # .to() replaces every tensor: fp64 takes the library path
    _check("after .double()", fused, model, x.double())


def test_other_input_shapes_reuse_or_repack_correctly():
    model = _model("resnet18").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    for shape in [(2, 3, 64, 64), (1, 3, 48, 80), (3, 3, 64, 64), (2, 3, 64, 64)]:
        _check(str(shape), fused, model, torch.randn(shape).contiguous(memory_format=CL))


def test_autocast_bfloat16_inference(monkeypatch):
    if not conv_mkldnn.bf16_supported():
        pytest.skip("no native bfloat16 on this CPU")
    model = _model("resnet50").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    spy = _Spy(monkeypatch)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused(x), model(x)
    ref = copy.deepcopy(model).double()(x.double())
    assert spy.calls > 0 and spy.prepacked == spy.calls
    c = compare("bf16 logits", got.float(), ref, want.float())
    assert c.ok, c


def test_bfloat16_model_inference():
    if not conv_mkldnn.bf16_supported():
        pytest.skip("no native bfloat16 on this CPU")
    model = _model("resnet18").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model)).bfloat16()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad():
        got, want = fused(x.bfloat16()), model.bfloat16()(x.bfloat16())
    ref = copy.deepcopy(model).double()(x.double())
    c = compare("bf16 model logits", got.float(), ref, want.float())
    assert c.ok, c


def test_library_path_when_onednn_is_disabled_or_not_chosen(monkeypatch):
    model = _model("resnet18").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    spy = _Spy(monkeypatch)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    with torch.backends.mkldnn.flags(enabled=False):
        _check("oneDNN disabled", fused, model, x)
    with conv_ops.use_path("library"):
        _check("library path forced", fused, model, x)
    with fr.backend.use("cpp"):
        _check("C++ epilogue backend", fused, model, x)
    assert spy.calls == 0


def test_autograd_recording_eval_takes_the_differentiable_op(monkeypatch):
    """Fine-tuning with frozen BN (eval mode, gradients on): the custom op with a backward runs
    (its CPU forward is oneDNN's, without prepacked weights) and the gradients match the
    unfused model's."""
    model = _model("resnet18").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    spy = _Spy(monkeypatch)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    fused(x).sum().backward()
    model(x).sum().backward()
    assert spy.prepacked == 0 and spy.into_residual == []
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_conv2d_epilogue_op_runs_onednn_on_cpu():
    """The custom ops themselves (what torch.compile and export see) take the oneDNN path on
    CPU, without prepacking: residual add and ReLU, and the dual projection GEMM."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=CL)
    w = torch.randn(32, 16, 3, 3)
    b = torch.randn(32)
    r = torch.randn(2, 32, 9, 9).contiguous(memory_format=CL)
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), 1, 1)
                     + r.double())
    r_kept = r.clone()
    out = torch.ops.fused_resnet.conv2d_epilogue(x, w, [1, 1], [1, 1], [1, 1], 1, None, b, r,
                                                 True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(r, r_kept) and out.is_contiguous(memory_format=CL)
    s = torch.randn(2, 8, 17, 17).contiguous(memory_format=CL)
    ws = torch.randn(32, 8, 1, 1)
    w1 = torch.randn(32, 16, 1, 1)
    dual = torch.ops.fused_resnet.conv2d_dual_epilogue(x, w1, [1, 1], [0, 0], s, ws, 2, b, True)
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), w1.double(), b.double())
                     + torch.nn.functional.conv2d(s.double(), ws.double(), stride=2))
    torch.testing.assert_close(dual.double(), ref, rtol=1e-4, atol=1e-4)
    assert conv_ops.choose_path("epilogue", {"library": None, "mkldnn": None}, x, w, [1, 1],
                                [1, 1], [1, 1], 1) == "mkldnn"


@pytest.mark.parametrize("residual", [False, True])
def test_onednn_conv_of_a_single_pixel_map_with_channels_last_strides(residual):
    """A 1x1 map (layer4 of a small image) as a channels_last producer leaves it, strides
    (C, 1, C, C), beside a dense channels_last weight: torch 2.11's oneDNN ops raised "could not
    create a memory" on it (torch.compile of a fused resnet18 at 32px); it must compute."""
    torch.manual_seed(0)
    x = torch.randn(2 * 64).as_strided((2, 64, 1, 1), (64, 1, 64, 64))
    w = torch.randn(64, 64, 3, 3).contiguous(memory_format=CL)
    b = torch.randn(64)
    r = torch.randn(2 * 64).as_strided((2, 64, 1, 1), (64, 1, 64, 64)) if residual else None
    out = torch.ops.fused_resnet.conv2d_epilogue(x, w, [1, 1], [1, 1], [1, 1], 1, None, b, r,
                                                 True)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), 1, 1)
    ref = torch.relu(ref + r.double() if residual else ref)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_and_export_of_the_cpu_path():
    model = _model("resnet18").to(memory_format=CL)
    fused = fr.fuse_(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(fused, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, want, rtol=1e-3, atol=1e-3)
    exported = torch.export.export(fused, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-3, atol=1e-3)
    assert list(fused.state_dict()) == list(model.state_dict())


def test_info_names_the_cpu_path():
    entry = fr.info()["cpu_conv"]
    assert "oneDNN" in entry["path"] and "float32" in entry["dtypes"]


def test_unfuse_restores_plain_sequentials():
    model = _model("resnet50")
    fr.fuse_(model)
    assert type(model.layer1) is stage.FusedSequential
    fr.unfuse_(model)
    assert all(type(getattr(model, f"layer{i}")) is nn.Sequential for i in range(1, 5))
