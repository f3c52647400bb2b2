"""No silent corruption of a model's state:

- an empty batch (N=0) does what nn.BatchNorm2d does: empty output, gradients that flow (zeros
  for the BN parameters), running statistics left exactly as they were, num_batches_tracked
  counted, in train and eval, for the functional op and for every fused module;
- an exception anywhere in a fused block (a failing op, a bad residual, bad buffers) leaves
  every buffer of the block as it was: running statistics are applied only once the whole
  block has run.

Everything is compared with the unfused PyTorch model (or nn.BatchNorm2d) on the CPU."""

import copy
import functools

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet as tv

import fused_resnet as fr
from fused_resnet.models import PlainBlock, ZeroPadShortcut

# ---- models -------------------------------------------------------------------------------------


def _projection(inplanes, planes, stride):
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


def _timm_avg_down(inplanes, planes, stride):
    return nn.Sequential(nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False),
                         nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))


def _conv_bn_act():
    return fr.FusedConvBNAct.from_block(torchvision.ops.Conv2dNormActivation(8, 16, 3, stride=2))


def _torchvision_resnet(block) -> nn.Module:
    """A torchvision ResNet (its stem fuses) cut after layer1, to keep it small (stride-2
    projections: the timm and CIFAR models)."""
    model = tv.ResNet(block, [1, 1, 1, 1], num_classes=4)
    model.layer2 = model.layer3 = model.layer4 = nn.Identity()
    model.fc = nn.Linear(64 * block.expansion, 4)
    return model


def _timm_resnet(block, **kwargs) -> nn.Module:
    return timm.models.resnet.ResNet(block, [1, 1, 1, 1], channels=(8, 16, 16, 16),
                                     num_classes=4, **kwargs)


# name -> (build the unfused module, fuse it, input channels)
MODULES = {
    "torchvision_basic": (lambda: _torchvision_resnet(tv.BasicBlock), fr.fuse_, 3),
    "torchvision_bottleneck": (lambda: _torchvision_resnet(tv.Bottleneck), fr.fuse_, 3),
    "timm_basic": (lambda: _timm_resnet(timm.models.resnet.BasicBlock), fr.fuse_, 3),
    "timm_bottleneck_deep_stem_avg_down": (
        lambda: _timm_resnet(timm.models.resnet.Bottleneck, stem_type="deep", stem_width=8,
                             avg_down=True), fr.fuse_, 3),
    "cifar_option_A": (lambda: fr.models.cifar_resnet(8, shortcut="A"), fr.fuse_, 3),
    "cifar_option_B": (lambda: fr.models.cifar_resnet(8, shortcut="B"), fr.fuse_, 3),
    "cifar_plain": (lambda: fr.models.cifar_resnet(8, plain=True), fr.fuse_, 3),
    "conv_bn_act": (lambda: torchvision.ops.Conv2dNormActivation(8, 16, 3, stride=2),
                    fr.FusedConvBNAct.from_block, 8),
}

# Single blocks for the failure tests: every buffer of the block must survive a failure.
BLOCKS = {
    "basic_projection": lambda: tv.BasicBlock(8, 16, 2, _projection(8, 16, 2)),
    "bottleneck_projection": lambda: tv.Bottleneck(8, 4, 2, _projection(8, 16, 2)),
    "bottleneck_identity": lambda: tv.Bottleneck(16, 4),
    "cifar_option_A": lambda: tv.BasicBlock(8, 16, 2, ZeroPadShortcut(2, 8, 16)),
    "plain": lambda: PlainBlock(8, 16, 2),
    "timm_basic_projection": lambda: timm.models.resnet.BasicBlock(8, 16, 2,
                                                                   _projection(8, 16, 2)),
    "timm_bottleneck_avg_down": lambda: timm.models.resnet.Bottleneck(8, 4, 2,
                                                                      _timm_avg_down(8, 16, 2)),
}


def _configure_bns(model: nn.Module, variant: str) -> nn.Module:
    """Non-trivial BN state, then the nn.BatchNorm2d configuration `variant`."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.BatchNorm2d):
                continue
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(3)
            if variant == "momentum_none":
                m.momentum = None
            elif variant == "affine_false":
                m.affine = False
                m.register_parameter("weight", None), m.register_parameter("bias", None)
            elif variant == "no_running_stats":
                m.track_running_stats = False
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    m.register_buffer(name, None)
    return model


@functools.lru_cache(maxsize=None)
def _built(name: str, variant: str) -> nn.Module:
    torch.manual_seed(0)
    return _configure_bns(MODULES[name][0](), variant)


def _pair(name, variant, dtype, channels_last, training):
    """(unfused, fused) copies of one module, in `dtype`, layout and mode."""
    unfused = copy.deepcopy(_built(name, variant)).to(dtype)
    if channels_last:
        unfused = unfused.to(memory_format=torch.channels_last)
    fused = MODULES[name][1](copy.deepcopy(unfused))
    return unfused.train(training), fused.train(training)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _differing(got: dict, want: dict) -> list:
    """Names (want's) of the entries that differ in dtype or value, pairing the two dicts in
    order (FusedConvBNAct names conv.* / bn.* what its Sequential names 0.* / 1.*)."""
    assert len(got) == len(want), (list(got), list(want))
    return [name for (name, b), a in zip(want.items(), got.values())
            if (a is None) != (b is None)
            or (b is not None and (a.dtype != b.dtype or not torch.equal(a, b)))]


def _assert_state_equal(got: dict, want: dict, what: str):
    differing = _differing(got, want)
    assert not differing, f"{what}: {differing} differ"


def _counts_one_more(after: dict, before: dict):
    """What nn.BatchNorm2d does with an empty batch in training: statistics bit-identical,
    num_batches_tracked + 1."""
    expected = {k: v + 1 if k.endswith("num_batches_tracked") else v for k, v in before.items()}
    _assert_state_equal(after, expected, "after an empty training batch")


# ---- empty batches: fused modules vs the unfused model ------------------------------------------
VARIANTS = ["momentum_0.1", "momentum_none", "affine_false", "no_running_stats"]
# (BN configuration, dtype, channels_last): each configuration once, each dtype and layout
# with several.
CONFIGS = [("momentum_0.1", torch.float32, False), ("momentum_0.1", torch.bfloat16, True),
           ("momentum_none", torch.float32, True), ("affine_false", torch.bfloat16, False),
           ("no_running_stats", torch.float32, False)]


def _empty_step(model, x: torch.Tensor):
    """Forward and backward of an empty batch: (output, input gradient, parameter gradients)."""
    model.zero_grad(set_to_none=True)
    image = x.clone().requires_grad_(True)
    out = model(image)
    out.float().sum().backward()
    return out, image.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_step(fused_step, unfused_step):
    (out_f, grad_f, params_f), (out_u, grad_u, params_u) = fused_step, unfused_step
    assert out_f.shape == out_u.shape and out_f.dtype == out_u.dtype
    assert grad_f.shape == grad_u.shape and grad_f.dtype == grad_u.dtype
    # zeros, exactly (a NaN here would end training)
    assert not _differing(params_f, params_u), f"gradients of {_differing(params_f, params_u)}"


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("variant, dtype, channels_last", CONFIGS,
                         ids=[f"{v}-{str(d)[6:]}-{'cl' if c else 'nchw'}" for v, d, c in CONFIGS])
def test_empty_batch_in_train_then_eval_matches_unfused(name, variant, dtype, channels_last):
    """An empty batch in training, then one in eval: outputs, gradients, buffers as the
    unfused model's at each step."""
    unfused, fused = _pair(name, variant, dtype, channels_last, True)
    x = torch.randn(0, MODULES[name][2], 16, 16, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = _state(unfused)
    for training in (True, False):
        unfused.train(training), fused.train(training)
        _assert_same_step(_empty_step(fused, x), _empty_step(unfused, x))
        _assert_state_equal(_state(fused), _state(unfused), f"fused vs unfused, {training=}")
        if training and variant != "no_running_stats":
            _counts_one_more(_state(fused), before)
            before = _state(fused)
        else:
            _assert_state_equal(_state(fused), before, f"{training=}")


def test_empty_batch_then_eval_gives_the_unfused_outputs():
    """The reported case: an empty training batch, then eval on real images."""
    unfused, fused = _pair("torchvision_basic", "momentum_0.1", torch.float32, False, True)
    for model in (unfused, fused):
        model(torch.randn(0, 3, 32, 32))
        model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = fused(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, unfused(x), rtol=1e-4, atol=1e-4)


def test_eval_backward_through_fused_stem_matches_unfused():
    """Fine-tuning with frozen BN statistics (eval mode, trainable weights): the inplace ReLU
    after a fused stem must not break backward (it used to overwrite the output the fused
    conv keeps for its ReLU's backward)."""
    unfused, fused = _pair("torchvision_basic", "momentum_0.1", torch.float32, False, False)
    x = torch.randn(2, 3, 16, 16)
    unfused(x).sum().backward()
    fused(x).sum().backward()
    for (pname, p), q in zip(fused.named_parameters(), unfused.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=pname)


# ---- empty batches: the functional op vs nn.BatchNorm2d + add + ReLU ----------------------------
def _batch_norm_add_relu_step(bn: nn.BatchNorm2d, x, residual, fused: bool):
    """relu(bn(x) + residual), by the functional op with bn's parameters and buffers or by bn
    itself: (output, gradients of x, residual and bn's parameters)."""
    bn.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    residual = residual.clone().requires_grad_(True) if residual is not None else None
    if fused:
        out = fr.functional.batch_norm_add_relu(
            x, residual, bn.running_mean, bn.running_var, bn.weight, bn.bias,
            training=bn.training or bn.running_mean is None, momentum=bn.momentum, eps=bn.eps,
            num_batches_tracked=bn.num_batches_tracked if bn.training else None)
    else:
        out = torch.relu(bn(x) + residual if residual is not None else bn(x))
    out.float().sum().backward()
    inputs = {"input": x.grad, "residual": residual.grad if residual is not None else None}
    return out, inputs, {n: p.grad for n, p in bn.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_functional_empty_batch_in_train_then_eval_matches_batchnorm(variant, dtype, residual,
                                                                     channels_last):
    torch.manual_seed(0)
    bn = _configure_bns(nn.BatchNorm2d(6), variant).to(dtype)
    twin = copy.deepcopy(bn)
    x = torch.randn(0, 6, 5, 5, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if residual else None
    before = _state(bn)
    for training in (True, False):
        bn.train(training), twin.train(training)
        (out_f, inputs_f, params_f) = _batch_norm_add_relu_step(twin, x, r, fused=True)
        (out_u, inputs_u, params_u) = _batch_norm_add_relu_step(bn, x, r, fused=False)
        assert out_f.shape == out_u.shape and out_f.dtype == out_u.dtype
        for name, want in inputs_u.items():
            got = inputs_f[name]
            assert want is None or (got.shape == want.shape and got.dtype == want.dtype), name
        assert not _differing(params_f, params_u), f"gradients of {_differing(params_f, params_u)}"
        _assert_state_equal(_state(twin), _state(bn), f"vs nn.BatchNorm2d, {training=}")
        if training and variant != "no_running_stats":
            _counts_one_more(_state(twin), before)
            before = _state(twin)
        else:
            _assert_state_equal(_state(twin), before, f"{training=}")


# ---- failures leave every buffer untouched ------------------------------------------------------
class InjectedFailure(RuntimeError):
    pass


class FailAtOp(TorchDispatchMode):
    """Raises InjectedFailure at the `fail_at`-th call (from 0) of any fused_resnet op; with
    fail_at=None only counts the calls."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_resnet":
            if self.calls == self.fail_at:
                raise InjectedFailure(f"injected failure at {func}")
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _fused_block(name: str, variant: str) -> nn.Module:
    torch.manual_seed(0)
    block = _configure_bns(BLOCKS[name](), variant).train()
    fused = fr.fuse_(nn.Sequential(block))
    assert not fused.fused_resnet_report["left"], fused.fused_resnet_report
    return fused


def _assert_every_failure_leaves_state(model: nn.Module, x: torch.Tensor):
    """Fail at each fused op the forward calls, in turn: every buffer stays as it was."""
    model_copy = copy.deepcopy(model)
    with FailAtOp() as counter:
        model_copy(x)
    assert counter.calls >= 2, "the forward should run several fused ops"
    before = _state(model)
    for fail_at in range(counter.calls):
        with pytest.raises(InjectedFailure), FailAtOp(fail_at):
            model(x)
        _assert_state_equal(_state(model), before, f"failure at fused op #{fail_at}")


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("variant", ["momentum_0.1", "momentum_none"])
def test_failing_op_in_a_block_leaves_every_buffer(name, variant):
    model = _fused_block(name, variant)
    channels = 16 if name == "bottleneck_identity" else 8
    _assert_every_failure_leaves_state(model, torch.randn(2, channels, 8, 8))


def test_failing_op_in_the_stem_leaves_every_buffer():
    """The ops of a fused stem (conv -> BN statistics -> BN apply) fail in turn; the stem is
    the first thing the model runs, so every buffer of the model must be untouched."""
    model = fr.fuse_(_configure_bns(_torchvision_resnet(tv.BasicBlock), "momentum_0.1"))
    model.train()
    x = torch.randn(2, 3, 16, 16)
    before = _state(model)
    for fail_at in (0, 1):  # conv2d_bn_stats, then bn_add_relu: both the stem's
        with pytest.raises(InjectedFailure), FailAtOp(fail_at):
            model(x)
        _assert_state_equal(_state(model), before, f"failure at fused op #{fail_at}")


def test_failing_op_in_conv_bn_act_leaves_every_buffer():
    torch.manual_seed(0)
    model = _configure_bns(_conv_bn_act(), "momentum_0.1").train()
    _assert_every_failure_leaves_state(model, torch.randn(2, 8, 9, 9))


def test_bad_residual_through_conv_bn_act_leaves_every_buffer():
    """The residual's shape is checked by the functional op after the conv has run: the BN's
    statistics must not be applied."""
    torch.manual_seed(0)
    model = _configure_bns(_conv_bn_act(), "momentum_0.1").train()
    before = _state(model)
    with pytest.raises(ValueError, match="residual has shape"):
        model(torch.randn(2, 8, 9, 9), torch.randn(2, 16, 4, 4))
    _assert_state_equal(_state(model), before, "bad residual")


def test_bad_residual_through_functional_leaves_every_buffer():
    torch.manual_seed(0)
    bn = _configure_bns(nn.BatchNorm2d(6), "momentum_0.1")
    before = _state(bn)
    with pytest.raises(ValueError, match="residual has shape"):
        fr.functional.batch_norm_add_relu(
            torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 3), bn.running_mean, bn.running_var,
            bn.weight, bn.bias, training=True, num_batches_tracked=bn.num_batches_tracked)
    _assert_state_equal(_state(bn), before, "bad residual")


def test_mismatched_running_stat_dtypes_raise_before_any_update():
    """running_mean and running_var of different dtypes: F.batch_norm refuses them; so does the
    functional op, before it touches either buffer or the counter."""
    torch.manual_seed(0)
    bn = _configure_bns(nn.BatchNorm2d(6), "momentum_0.1")
    bn.running_var = bn.running_var.bfloat16()
    before = _state(bn)
    with pytest.raises(TypeError, match="running_var"):
        fr.functional.batch_norm_add_relu(
            torch.randn(2, 6, 4, 4), None, bn.running_mean, bn.running_var, bn.weight, bn.bias,
            training=True, num_batches_tracked=bn.num_batches_tracked)
    _assert_state_equal(_state(bn), before, "mismatched buffer dtypes")
