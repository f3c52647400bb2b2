"""fr.fuse_ / unfuse_ on torchvision and timm ResNets (small inputs, CPU, fp32): eval and train outputs,
gradients of every parameter and running statistics vs the unfused model with the same weights
(error vs float64 at most twice the unfused model's own, fused_resnet.verify.compare);
state_dict compatibility both ways, idempotence, filter_fn, unfuse_."""

import copy
import os
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from torchvision.models import resnet as tv
from torchvision.models.resnet import BasicBlock

import fused_resnet as fr
from conftest import plain_twin
from fused_resnet.bench.memory import saved_activation_bytes
from fused_resnet.verify import compare, normwise_error

# "timm:<name>" is timm.create_model(<name>): resnet50d has the deep stem and avg-pool shortcuts
FAST = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "timm:resnet18",
        "timm:resnet26", "timm:resnet50d"]
SLOW = ["resnet34", "resnet101", "resnet152", "wide_resnet101_2", "resnext101_32x8d",
        "resnext101_64x4d", "timm:resnet50"]
CONSTRUCTORS = FAST + [pytest.param(name, marks=pytest.mark.slow) for name in SLOW]


def _build(name, **kwargs):
    if name.startswith("timm:"):
        return timm.create_model(name[5:], pretrained=False, num_classes=10, **kwargs)
    return getattr(torchvision.models, name)(num_classes=10, **kwargs)


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = _build(name, **kwargs)
    with torch.no_grad():  # non-trivial BN parameters and statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model


def _three(model, cpu=True, **fuse_kwargs):
    """(fused, plain fp32, plain fp64) copies of one model; the plain fp32 one computes in the
    layout the fused one does (conftest.plain_twin)."""
    plain = plain_twin(model, cpu, fuse_kwargs.get("cpu_channels_last", True))
    return fr.fuse_(copy.deepcopy(model), **fuse_kwargs), plain, copy.deepcopy(model).double()


def _assert_close_to_reference(name, got, plain, ref64):
    c = compare(name, got, ref64, plain)
    assert c.ok, c


@pytest.mark.parametrize("name", CONSTRUCTORS)
@pytest.mark.parametrize("memory_format, inside", [
    (torch.contiguous_format, True), (torch.contiguous_format, False),
    (torch.channels_last, True)], ids=["nchw", "nchw-kept", "nhwc"])
def test_eval_matches_torchvision(name, memory_format, inside):
    """On a CPU: oneDNN's fused convs, prepacked for channels_last (with the stage's donated
    residuals), which an NCHW model computes in from its stem on (NCHW weights), unpacked for
    an NCHW model kept NCHW (cpu_channels_last=False)."""
    model = _model(name).to(memory_format=memory_format)
    fused, plain, ref = (m.eval() for m in _three(model, cpu_channels_last=inside))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
    with torch.no_grad():
        _assert_close_to_reference("eval logits", fused(x), plain(x), ref(x.double()))


def _train_steps(models, steps=3):
    """Run the same training steps (forward, cross-entropy, backward) on each model; yield,
    per step, the logits and the parameter gradients of each."""
    for step in range(steps):
        x = torch.randn(4, 3, 64, 64)
        target = torch.randint(0, 10, (4,))
        results = []
        for model in models:
            model.zero_grad()
            dtype = next(model.parameters()).dtype
            logits = model(x.to(dtype))
            torch.nn.functional.cross_entropy(logits, target).backward()
            results.append((logits, [p.grad for p in model.parameters()]))
        yield step, results


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_training_composition_exact_in_float64(name):
    """The fused modules compose exactly what torchvision computes: in float64 (the torch
    reference backend) logits, running statistics and num_batches_tracked agree to 1e-7
    relative and every parameter's gradient over three steps to 1e-8 normwise (float64
    rounding amplified through up to 152 layers: single elements of resnet152's stem gradient
    were seen 2e-7 off elementwise; a wrong term would be O(1))."""
    model = _model(name).double()
    fused, plain = fr.fuse_(copy.deepcopy(model)), copy.deepcopy(model)
    with fr.backend.use("torch"):
        for step, ((logits, grads), (logits_p, grads_p)) in _train_steps([fused, plain]):
            torch.testing.assert_close(logits, logits_p, rtol=1e-7, atol=1e-9)
            for (pname, _), g, gp in zip(fused.named_parameters(), grads, grads_p):
                err = normwise_error(g, gp)
                assert err <= 1e-8, f"step {step} grad {pname}: normwise difference {err:.2e}"
    for (bname, b), c in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-7, atol=1e-9, msg=lambda m: f"{bname}: {m}")


@pytest.mark.parametrize("name, inside", [pytest.param(name, True) for name in FAST] + [
    pytest.param(name, True, marks=pytest.mark.slow) for name in SLOW] + [
    pytest.param("resnet18", False), pytest.param("resnet50", False)])
def test_training_steps_match_torchvision(name, inside):
    """fp32 with the default (C++) kernels, three training steps: logits vs float64 (2x the
    plain model's error), running statistics, and gradients as a normwise sanity bound.
    Gradient exactness is test_training_composition_exact_in_float64's job: in fp32 a ReLU
    whose input is within rounding of zero may decide either way (in the plain model too, and
    not at the same elements), which moves upstream gradients by O(|g|) from that element:
    seen up to 2e-2 normwise (plain: 2.5e-3) for a layer4 BN of a 64x64 batch of 4 (16 values
    per channel), 3e-6 on another seed. A flip early in the network moves every gradient
    upstream of it: 6.6e-3 over all of resnet18's gradients at one step (every tensor upstream
    of layer2.0 ~6e-3, everything else 5e-6, the plain model 6.5e-3 at the step before) when
    the C++ kernels began to run with AVX-512 FMAs. Over all gradients of three steps (64x64
    batches of 4), with flips wherever they fall, PyTorch's own channels_last resnet50 was
    4.4e-2 off float64 at one step (its NCHW model 1.6e-2), its channels_last resnet34 5.4e-3
    and 1.1e-2 where its NCHW model stayed at 9e-6 and the fused model (channels_last inside)
    was 2.7e-2 and 1.1e-2; a model kept NCHW (cpu_channels_last=False) 9e-6. A wrong or missing
    term is O(1): bounds of 0.1 per tensor and 5e-2 over all gradients together (or 4x the
    plain model's) still catch it."""
    fused, plain, ref = _three(_model(name), cpu_channels_last=inside)
    for step, ((logits, grads), (logits_p, grads_p), (logits_r, grads_r)) in \
            _train_steps([fused, plain, ref]):
        _assert_close_to_reference(f"step {step} logits", logits, logits_p, logits_r)
        for (pname, _), g, gp, gr in zip(fused.named_parameters(), grads, grads_p, grads_r):
            err, err_plain = normwise_error(g, gr), normwise_error(gp, gr)
            assert err <= max(4 * err_plain, 0.1), \
                f"step {step} grad {pname}: normwise error {err:.2e}, plain {err_plain:.2e}"
        flat = [torch.cat([t.flatten().double() for t in gs]) for gs in (grads, grads_p, grads_r)]
        err, err_plain = normwise_error(flat[0], flat[2]), normwise_error(flat[1], flat[2])
        assert err <= max(4 * err_plain, 5e-2), f"step {step} all gradients: {err:.2e}"
    for (bname, b), c, r in zip(fused.named_buffers(), plain.buffers(), ref.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, c), bname
        else:  # running statistics of deep layers inherit the activations' rounding
            _assert_close_to_reference(bname, b, c, r)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "timm:resnet50d"])
def test_state_dict_round_trips(name):
    model = _model(name)
    fused = fr.fuse_(copy.deepcopy(model))
    assert list(fused.state_dict()) == list(model.state_dict())
    plain = _build(name)
    plain.load_state_dict(fused.state_dict(), strict=True)  # fused -> plain
    refused = fr.fuse_(_build(name))
    refused.load_state_dict(plain.state_dict(), strict=True)  # plain -> fused
    for (k, a), b in zip(model.state_dict().items(), refused.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "timm:resnet50d"])
def test_training_keeps_less_for_backward_than_eager(name):
    """Eager keeps, per block, each conv's output (for BN) and each activation (for the next
    conv and the ReLU); the fused blocks keep the conv outputs and 1-bit ReLU masks, never the
    activations between a block's convs (recomputed in backward). Measured here: 0.87x
    (resnet18), 0.85x (resnet50) of eager's bytes; the stem, max-pool indices, block inputs
    and last conv outputs are kept by both."""
    model = _model(name).train()
    fused = fr.fuse_(copy.deepcopy(model))
    x = torch.randn(4, 3, 64, 64)
    eager, ours = saved_activation_bytes(model, x), saved_activation_bytes(fused, x)
    assert ours <= 0.9 * eager, f"fused keeps {ours / eager:.3f}x of eager's saved bytes"


def test_fused_blocks_share_parameters_and_unfuse_restores():
    model = _model("resnet50")
    params = {id(p) for p in model.parameters()}
    fr.fuse_(model)
    assert {id(p) for p in model.parameters()} == params  # shared, not copied
    assert isinstance(model.layer1[0], fr.FusedBottleneck)
    fr.unfuse_(model)
    assert type(model.layer1[0]) is tv.Bottleneck and type(model.layer4[2]) is tv.Bottleneck
    assert {id(p) for p in model.parameters()} == params
    assert not hasattr(model, "fused_resnet_report")


def test_fuse_is_idempotent_and_reports():
    model = fr.fuse_(_model("resnet18"))
    first = [type(m) for m in model.modules()]
    fr.fuse_(model)
    assert [type(m) for m in model.modules()] == first
    assert len(model.fused_resnet_report["fused"]) == 9  # 8 blocks and the stem
    assert "conv1" in model.fused_resnet_report["fused"]


def test_stem_keeps_names_and_unfuses():
    model = _model("resnet18")
    conv1, bn1 = model.conv1, model.bn1
    fr.fuse_(model)
    assert isinstance(model.conv1, fr.modules.FusedStem)
    assert isinstance(model.bn1, fr.modules.StemBatchNorm)
    assert model.conv1.weight is conv1.weight and model.bn1.running_mean is bn1.running_mean
    model.eval()
    fr.unfuse_(model)
    assert model.conv1 is conv1 and model.bn1 is bn1 and not bn1.training


def test_filter_fn_selects_blocks():
    model = fr.fuse_(_model("resnet18"), filter_fn=lambda m, fqn: fqn.startswith("layer1"))
    assert isinstance(model.layer1[0], fr.FusedBasicBlock)
    assert type(model.layer2[0]) is tv.BasicBlock
    assert model.fused_resnet_report["left"]["layer2.0"] == "excluded by filter_fn"


def test_sync_batchnorm_fuses_and_without_a_process_group_is_batchnorm():
    """Outside torch.distributed, nn.SyncBatchNorm is nn.BatchNorm2d (its own fallback), so the
    unfused SyncBatchNorm model is the reference here; synchronised training with two
    processes is tests/test_sync_batchnorm.py's."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model("resnet18"))
    fused, plain, ref = _three(model)
    assert fused.fused_resnet_report["left"] == {} and len(fused.fused_resnet_report["fused"]) == 9
    assert isinstance(fused.layer1[0], fr.FusedBasicBlock)
    for step, ((logits, grads), (logits_p, grads_p), (logits_r, grads_r)) in \
            _train_steps([fused, plain, ref], steps=2):
        _assert_close_to_reference(f"step {step} logits", logits, logits_p, logits_r)
        for (pname, _), g, gp, gr in zip(fused.named_parameters(), grads, grads_p, grads_r):
            err, err_plain = normwise_error(g, gr), normwise_error(gp, gr)
            assert err <= max(4 * err_plain, 0.1), f"step {step} grad {pname}: {err:.2e}"
    for (bname, b), c, r in zip(fused.named_buffers(), plain.buffers(), ref.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, c), bname
        else:
            _assert_close_to_reference(bname, b, c, r)
    fr.unfuse_(fused)
    assert type(fused.layer1[0]) is tv.BasicBlock and type(fused.bn1) is torch.nn.SyncBatchNorm


@pytest.mark.parametrize("name, kwargs, left", [
    ("seresnet18", {}, "has se (SEModule)"),
    ("resnetblur18", {}, "aa is BlurPool2d"),
    ("resnet18", dict(drop_path_rate=0.2), "has drop_path (DropPath)"),
    ("resnet26", dict(drop_block_rate=0.2), "drop_block is DropBlock2d")],
    ids=["attention", "anti_aliasing", "drop_path", "drop_block"])
def test_timm_blocks_that_cannot_be_expressed_are_left_and_reported(name, kwargs, left):
    """Blocks with squeeze-excite, anti-aliasing, drop-path or drop-block stay timm's own
    (reported with the reason); the rest of the model is fused and the whole model still
    computes what the unfused one does (train and eval, float64, torch backend)."""
    model = _model("timm:" + name, **kwargs).double()
    fused, plain = fr.fuse_(copy.deepcopy(model)), copy.deepcopy(model)
    report = fused.fused_resnet_report
    assert report["left"] and all(reason.startswith(left) for reason in report["left"].values())
    assert "conv1" in report["fused"]
    for fqn in report["left"]:
        assert type(fused.get_submodule(fqn)) is type(model.get_submodule(fqn))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with fr.backend.use("torch"):
        for training in (False, True):
            fused.train(training), plain.train(training)
            torch.manual_seed(1)  # the same drop-path / drop-block draws in both models
            out = fused(x)
            torch.manual_seed(1)
            torch.testing.assert_close(out, plain(x), rtol=1e-9, atol=1e-9)


def test_timm_deep_stem_fuses_each_conv_and_unfuses():
    model = _model("timm:resnet50d")
    originals = list(model.conv1) + [model.bn1]
    fr.fuse_(model)
    assert model.fused_resnet_report["fused"][:3] == ["conv1.0", "conv1.3", "conv1.6"]
    assert [type(m).__name__ for m in model.conv1] == [
        "FusedStem", "StemBatchNorm", "ReLU", "FusedStem", "StemBatchNorm", "ReLU", "FusedStem"]
    assert isinstance(model.bn1, fr.modules.StemBatchNorm)
    assert isinstance(model.layer2[0], fr.modules.FusedTimmBottleneck)
    fr.unfuse_(model)
    assert list(model.conv1) + [model.bn1] == originals
    assert type(model.layer2[0]) is timm.models.resnet.Bottleneck


def test_fuse_never_imports_timm():
    """timm is optional: fusing a torchvision model does not import it."""
    code = ("import sys, torchvision, fused_resnet as fr; "
            "fr.fuse_(torchvision.models.resnet18()); assert 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.expanduser("~"))


@pytest.mark.parametrize("kwargs", [dict(zero_init_residual=True),
                                    dict(replace_stride_with_dilation=[False, True, True])],
                         ids=["zero_init_residual", "dilation"])
def test_constructor_options(kwargs):
    fused, plain, ref = _three(_model("resnet50", **kwargs))
    x = torch.randn(2, 3, 64, 64)
    for mode in ("train", "eval"):
        for m in (fused, plain, ref):
            m.train(mode == "train")
        with torch.no_grad():
            _assert_close_to_reference(f"{mode} logits", fused(x), plain(x), ref(x.double()))


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grayscale"])
@pytest.mark.parametrize("inside", [True, False], ids=["channels_last", "kept"])
def test_nchw_model_computes_in_channels_last_on_cpu(inside, channels):
    """fuse_ runs an NCHW model in channels_last on the CPU from its stem on (cpu_channels_last,
    the default): what a hook on a stage sees is channels_last (a one-channel input, whose
    strides say nothing, too: the stem converts its output then), the parameters keep their
    layout, the input's gradient is as exact as PyTorch's. False keeps NCHW throughout;
    fuse_ again sets it anew."""
    model = _model("resnet18")
    if channels == 1:
        model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    fused, plain, ref = (m.train() for m in _three(model, cpu_channels_last=inside))
    seen = []
    fused.layer1.register_forward_hook(lambda module, args, output: seen.append(output))
    grads = []
    for model, dtype in ((fused, torch.float32), (plain, torch.float32), (ref, torch.float64)):
        x = torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(1),
                        dtype=dtype).requires_grad_()
        model(x).square().sum().backward()
        grads.append(x.grad)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) == inside
    assert seen[0].is_contiguous() != inside
    assert fused.conv1.weight.is_contiguous() and fused.layer1[0].conv1.weight.is_contiguous()
    _assert_close_to_reference("input gradient", *grads)
    fr.fuse_(fused, cpu_channels_last=not inside)
    fused(torch.randn(2, channels, 32, 32))
    assert seen[1].is_contiguous(memory_format=torch.channels_last) != inside


def test_channels_last_inference_mode_and_frozen_backbone():
    model = _model("resnet50").eval()
    fused = fr.fuse_(copy.deepcopy(model)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    for p in fused.parameters():  # frozen backbone, trainable head
        p.requires_grad_(False)
    fused.fc.weight.requires_grad_(True)
    fused(x).sum().backward()
    assert fused.fc.weight.grad is not None


def test_folded_weights_follow_parameter_updates():
    """Eval after an optimizer step and after load_state_dict uses the new weights."""
    model = _model("resnet18")
    fused = fr.fuse_(copy.deepcopy(model)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = fused(x)
        for p in fused.parameters():
            p.add_(0.01)
        after = fused(x)
        model.load_state_dict(fused.state_dict())
        torch.testing.assert_close(after, model.eval()(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("training, backend", [(False, "aot_eager"), (True, "aot_eager"),
                                               (True, "inductor")],
                         ids=["eval", "train", "train-inductor"])
def test_torch_compile_fullgraph_fused_resnet18(training, backend):
    """aot_eager: the same kernels as eager, traced; inductor also holds every custom op's
    output to the strides its fake kernel promised (an NCHW model computing in channels_last
    passes channels_last inputs with NCHW weights)."""
    model = fr.fuse_(_model("resnet18")).train(training)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    if training:
        out, out_c = model(x), compiled(x)
        out.sum().backward()
        out_c.sum().backward()
        for (pname, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{pname}: {m}")
        for b, c in zip(model.buffers(), twin.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)
    else:
        with torch.no_grad():
            out, out_c = model(x), compiled(x)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_autocast_bfloat16_matches_unfused(training):
    """Under autocast the fused blocks run their convs in bf16 as PyTorch's do; logits agree
    with the unfused model under autocast within bf16 rounding (vs the fp64 model, 2x the
    unfused model's error)."""
    fused, plain, ref = (m.train(training) for m in _three(_model("resnet50")))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_p = fused(x), plain(x)
        _assert_close_to_reference("autocast logits", out.float(), out_p.float(),
                                   ref(x.double()))


def test_torch_export_eval():
    model = fr.fuse_(_model("resnet18")).eval()
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", ["fuse_then_cast", "cast_then_fuse"])
def test_low_precision_models(dtype, order):
    """model.half() / .bfloat16() before or after fuse_: eval logits within 2x the unfused
    model's own error in that dtype (vs float64)."""
    model = _model("resnet18").eval()
    ref = copy.deepcopy(model).double()
    plain = copy.deepcopy(model).to(dtype)
    fused = fr.fuse_(copy.deepcopy(model)).to(dtype) if order == "fuse_then_cast" \
        else fr.fuse_(copy.deepcopy(model).to(dtype))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _assert_close_to_reference("logits", fused(x.to(dtype)), plain(x.to(dtype)),
                                   ref(x.double()))


# ---- the CIFAR zoo: residual (options A and B) and plain ----------------------------------------
@pytest.mark.parametrize("shortcut, plain", [("A", False), ("B", False), ("A", True)],
                         ids=["option_A", "option_B", "plain"])
def test_cifar_models_fuse_exactly(shortcut, plain):
    torch.manual_seed(0)
    model = fr.models.cifar_resnet(20, shortcut=shortcut, plain=plain)
    fused = fr.fuse_(copy.deepcopy(model).double())
    assert not fused.fused_resnet_report["left"], fused.fused_resnet_report
    assert len(fused.fused_resnet_report["fused"]) == 9  # 3 stages x 3 blocks
    plain_model = copy.deepcopy(model).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with fr.backend.use("torch"):
        for mode in (True, False):
            fused.train(mode), plain_model.train(mode)
            torch.testing.assert_close(fused(x), plain_model(x), rtol=1e-9, atol=1e-9)


def test_cifar_model_sizes():
    """ResNet-20 with option A has the paper's 0.27M parameters; option B adds the two
    projections; plain nets have no shortcut at all."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    a, b = fr.models.cifar_resnet(20, "A"), fr.models.cifar_resnet(20, "B")
    assert 0.26e6 < count(a) < 0.28e6
    assert count(b) - count(a) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    plain = fr.models.cifar_resnet(20, plain=True)
    assert not any(isinstance(m, BasicBlock) for m in plain.modules())
    for depth in (32, 44, 56, 110):
        assert fr.models.cifar_resnet(depth)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        fr.models.cifar_resnet(21)


# ---- GPU (skipped without one) -------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
                                  "timm:resnet50d"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_models_cuda_low_precision(name, dtype, training):
    """channels_last, autocast to bf16/fp16 on CUDA: logits vs the unfused model under the same
    autocast, both vs the float64 model (2x the unfused model's own error)."""
    fused, plain, ref = (m.cuda().train(training) for m in _three(_model(name), cpu=False))
    fused = fused.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=dtype):
            out, out_p = fused(x), plain(x)
        _assert_close_to_reference("logits", out.float(), out_p.float(), ref(x.double()))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "timm:resnet50d"])
def test_training_gradients_cuda_autocast(name, dtype):
    """Three training steps under autocast on CUDA (channels_last): every parameter's gradient
    vs the float64 model's, normwise, within 4x the unfused model's own error under the same
    autocast (or 0.05: bf16 gradients carry ~1e-2 relative error, a wrong term is O(1));
    running statistics vs float64 at 2x the unfused model's error."""
    fused, plain, ref = (m.cuda().train() for m in _three(_model(name), cpu=False))
    _assert_autocast_training(fused.to(memory_format=torch.channels_last), plain, ref, "cuda",
                              dtype, steps=3, batch=8)


@pytest.mark.parametrize("name", ["resnet50", pytest.param("timm:resnet50d",
                                                           marks=pytest.mark.slow)])
def test_training_gradients_cpu_autocast_bfloat16(name):
    """The same on a CPU under bf16 autocast, NCHW input (computed in channels_last), where the
    convolutions over few pixels run as bf16 GEMMs (csrc/cpu/conv_gemm.cpp) where oneDNN has
    native bf16, oneDNN's elsewhere."""
    fused, plain, ref = (m.train() for m in _three(_model(name)))
    _assert_autocast_training(fused, plain, ref, "cpu", torch.bfloat16, steps=2, batch=4)


def _assert_autocast_training(fused, plain, ref, device, dtype, steps, batch):
    for step in range(steps):
        x = torch.randn(batch, 3, 64, 64, device=device)
        if device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (batch,), device=device)
        grads = []
        for model, autocast in ((fused, True), (plain, True), (ref, False)):
            model.zero_grad()
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                logits = model(x.double() if model is ref else x)
            torch.nn.functional.cross_entropy(logits.double(), target).backward()
            grads.append([p.grad for p in model.parameters()])
        for (pname, _), g, gp, gr in zip(fused.named_parameters(), *grads):
            err, err_plain = normwise_error(g, gr), normwise_error(gp, gr)
            assert err <= max(4 * err_plain, 0.05), \
                f"step {step} grad {pname}: normwise error {err:.2e}, plain {err_plain:.2e}"
    for (bname, b), c, r in zip(fused.named_buffers(), plain.buffers(), ref.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, c), bname
        else:
            _assert_close_to_reference(bname, b, c, r)


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_capture_training_step():
    """A whole training step (forward, backward, SGD step) captured in a CUDA graph and
    replayed gives the parameters and running statistics an eager step gives."""
    model = fr.fuse_(_model("resnet18")).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (8,), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: settles every measured choice and allocation
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    twin_optimizer.zero_grad()
    torch.nn.functional.cross_entropy(twin(x), target).backward()
    twin_optimizer.step()
    torch.cuda.synchronize()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_capture_eval():
    model = fr.fuse_(_model("resnet50")).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)  # also settles every measured choice before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(x)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)


# ---- FusedConvBNAct -----------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_fused_conv_bn_act_from_block(training, relu):
    """From torchvision's Conv2dNormActivation (and back): outputs, input and parameter
    gradients and running statistics vs the block itself, in float64 on the torch backend."""
    torch.manual_seed(0)
    block = torchvision.ops.Conv2dNormActivation(
        8, 16, 3, stride=2, activation_layer=torch.nn.ReLU if relu else None).double()
    block.train(training)
    source = copy.deepcopy(block)
    fused = fr.FusedConvBNAct.from_block(source)
    assert fused.conv is source[0] and fused.bn is source[1] and fused.training == training
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    with fr.backend.use("torch"):
        out = fused(x)
    want = block(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g, = torch.autograd.grad(out.sum(), x)
    gw, = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g, gw, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fused.bn.running_mean, block[1].running_mean)
    with fr.backend.use("torch"), torch.no_grad():  # the residual argument
        plain_sum = block[1](block[0](x)) + residual
        expected = torch.relu(plain_sum) if relu else plain_sum
        torch.testing.assert_close(fused(x, residual), expected, rtol=1e-10, atol=1e-10)
    assert fused.to_block() is source


def test_fused_conv_bn_act_rejects_other_modules():
    with pytest.raises(TypeError, match="Sequential\\(Conv2d, BatchNorm2d"):
        fr.FusedConvBNAct.from_block(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)))
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        fr.FusedConvBNAct(torch.nn.Conv2d(3, 4, 1), torch.nn.GroupNorm(2, 4))
    # the norms a fused step takes (fused_resnet.modules.norms)
    fr.FusedConvBNAct(torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4))
    fr.FusedConvBNAct(torch.nn.Conv2d(3, 4, 1), torchvision.ops.misc.FrozenBatchNorm2d(4))
