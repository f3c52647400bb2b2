"""Detection and segmentation backbones.

FrozenBatchNorm2d (torchvision.ops.misc), the norm of every pretrained torchvision detection
backbone: fused and folded into the conv in training and eval, the convs still learning through
the folded weight. ResNet-50 with FrozenBN, an FPN backbone with frozen and trainable layers,
a Faster R-CNN training step and a RetinaNet, and a DeepLabV3 (dilated ResNet-50 body with
BatchNorm2d), each against the unfused model and float64."""

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet as fr
from conftest import plain_twin, randomise_batchnorms
from fused_resnet.modules import StemFrozenBatchNorm
from fused_resnet.verify import compare, normwise_error


def _randomise_frozen(model):
    """Non-trivial frozen statistics and affine parameters (the defaults are an identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model


def _resnet50_frozen():
    torch.manual_seed(0)
    return _randomise_frozen(torchvision.models.resnet50(num_classes=10,
                                                         norm_layer=FrozenBatchNorm2d))


def _three(model):
    """(fused, plain fp32 in the layout the fused one computes in, plain fp64)."""
    return fr.fuse_(copy.deepcopy(model)), plain_twin(model), copy.deepcopy(model).double()


def _assert_close(name, got, plain, ref64):
    c = compare(name, got, ref64, plain)
    assert c.ok, c


def _assert_gradients(fused, plain, ref, *other_plains):
    """Every parameter's gradient: fused vs float64 within 4x the plain model's error (the
    bound test_fuse's training test justifies; a missing or wrong term is O(1)); with
    other_plains (PyTorch computing the same in another layout), 4x the largest of PyTorch's
    errors."""
    checked = 0
    plains = [list(m.parameters()) for m in (plain,) + other_plains]
    for i, ((name, p), r) in enumerate(zip(fused.named_parameters(), ref.parameters())):
        q = plains[0][i]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:
            continue
        err = normwise_error(p.grad, r.grad)
        err_plain = max(normwise_error(ps[i].grad, r.grad) for ps in plains)
        assert err <= max(4 * err_plain, 1e-4), f"grad {name}: {err:.2e}, plain {err_plain:.2e}"
        checked += 1
    return checked


def test_resnet50_frozen_bn_fuses_every_block_and_the_stem():
    fused = fr.fuse_(_resnet50_frozen())
    report = fused.fused_resnet_report
    assert len(report["fused"]) == 17 and report["left"] == {}, report
    assert isinstance(fused.layer1[0], fr.FusedBottleneck)
    assert isinstance(fused.conv1, fr.modules.FusedStem)
    assert isinstance(fused.bn1, StemFrozenBatchNorm)
    fr.unfuse_(fused)
    assert type(fused.bn1) is FrozenBatchNorm2d and type(fused.layer1[0]) is \
        torchvision.models.resnet.Bottleneck


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_resnet50_frozen_bn_eval_matches(memory_format):
    fused, plain, ref = (m.eval().to(memory_format=memory_format)
                         for m in _three(_resnet50_frozen()))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
    with torch.no_grad():
        _assert_close("eval logits", fused(x), plain(x), ref(x.double()))


def test_resnet50_frozen_bn_training_step_matches():
    """Train mode changes nothing for a frozen BN (no statistics, no buffer update), but the
    convs learn: every conv weight's gradient flows through the folded weight."""
    fused, plain, ref = (m.train() for m in _three(_resnet50_frozen()))
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    for model in (fused, plain, ref):
        logits = model(x.to(next(model.parameters()).dtype))
        torch.nn.functional.cross_entropy(logits, target).backward()
        model.logits = logits.detach()
    _assert_close("train logits", fused.logits, plain.logits, ref.logits)
    assert _assert_gradients(fused, plain, ref) == len(list(plain.parameters()))
    for (name, b), c in zip(fused.named_buffers(), plain.buffers()):
        assert torch.equal(b, c), f"{name} changed"


def test_frozen_bn_state_dict_round_trips():
    model = _resnet50_frozen()
    fused = fr.fuse_(copy.deepcopy(model))
    assert list(fused.state_dict()) == list(model.state_dict())
    other = _randomise_frozen(torchvision.models.resnet50(num_classes=10,
                                                          norm_layer=FrozenBatchNorm2d))
    fused.load_state_dict(other.state_dict())  # a checkpoint of the unfused model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_close("after load_state_dict", fused.eval()(x), other.eval()(x),
                      copy.deepcopy(other).double()(x.double()))
    fresh = torchvision.models.resnet50(num_classes=10, norm_layer=FrozenBatchNorm2d)
    fresh.load_state_dict(fused.state_dict())  # and the other way


def _fpn_backbone():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    _randomise_frozen(backbone)
    return backbone


def test_fpn_backbone_with_trainable_layers_matches():
    """resnet_fpn_backbone: the body is an IntermediateLayerGetter (stem fused too); conv1 and
    layer1 frozen (requires_grad False), layer2..4 trainable."""
    fused, plain, ref = (m.train() for m in _three(_fpn_backbone()))
    assert len(fused.fused_resnet_report["fused"]) == 17, fused.fused_resnet_report
    assert isinstance(fused.body.conv1, fr.modules.FusedStem)
    x = torch.randn(2, 3, 64, 64)
    outs = [model(x.to(next(model.parameters()).dtype)) for model in (fused, plain, ref)]
    assert list(outs[0]) == list(outs[1])
    for key in outs[0]:
        _assert_close(f"feature {key}", outs[0][key], outs[1][key], outs[2][key])
    for model, out in zip((fused, plain, ref), outs):
        sum(o.square().mean() for o in out.values()).backward()
    assert _assert_gradients(fused, plain, ref) > 0
    assert fused.body.layer1[0].conv1.weight.grad is None  # frozen stays frozen
    assert fused.body.layer2[0].conv1.weight.grad is not None


def _detection_batch(dtype):
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [30.0, 20.0, 90.0, 75.0]]),
                "labels": torch.tensor([2, 1])}]
    return [i.to(dtype) for i in images], \
        [{"boxes": t["boxes"].to(dtype), "labels": t["labels"]} for t in targets]


def test_faster_rcnn_training_step_matches():
    """A Faster R-CNN training step on the FrozenBN FPN backbone: every loss and every
    gradient against float64, within 4x the unfused detector's own error (the samplers' random
    proposals seeded alike)."""
    torch.manual_seed(0)
    detector = FasterRCNN(_fpn_backbone(), num_classes=3, min_size=96, max_size=96)
    models = _three(detector)
    losses = []
    for model in models:
        model.train()
        torch.manual_seed(1)  # the batch, and the samplers' draws
        loss = model(*_detection_batch(next(model.parameters()).dtype))
        sum(loss.values()).backward()
        losses.append({key: value.detach() for key, value in loss.items()})
    for key in losses[2]:
        _assert_close(key, losses[0][key], losses[1][key], losses[2][key])
    assert _assert_gradients(*models) >= 70  # the backbone's trainable convs, FPN, RPN, heads


def test_retinanet_eval_matches():
    """RetinaNet's backbone: layers 2-4 returned, P6/P7 extra blocks; FrozenBN."""
    from torchvision.models.detection import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    backbone = _randomise_frozen(resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
        trainable_layers=3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)))
    detector = RetinaNet(backbone, num_classes=3, min_size=96, max_size=96).eval()
    models = _three(detector)
    assert len(models[0].fused_resnet_report["fused"]) == 17
    images = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        features = [m.backbone(torch.stack(images).to(next(m.parameters()).dtype))
                    for m in models]
        detections = [m([i.to(next(m.parameters()).dtype) for i in images]) for m in models]
    for key in features[0]:
        _assert_close(f"feature {key}", features[0][key], features[1][key], features[2][key])
    # the same boxes come out (scores are compared; a rounding-level change of a score near
    # the threshold could drop a box, which this seed does not)
    assert detections[0][0]["boxes"].shape == detections[1][0]["boxes"].shape
    _assert_close("scores", detections[0][0]["scores"], detections[1][0]["scores"],
                  detections[2][0]["scores"])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_deeplabv3_matches(train):
    """DeepLabV3 with the aux head: a dilated ResNet-50 body (replace_stride_with_dilation)
    with BatchNorm2d, layer3 and layer4 returned."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    model = randomise_batchnorms(deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                    num_classes=3, aux_loss=True)).train(train)
    models = _three(model) + (copy.deepcopy(model),)  # and PyTorch's NCHW model
    assert len(models[0].fused_resnet_report["fused"]) == 17, models[0].fused_resnet_report
    x = torch.randn(2, 3, 64, 64)
    outs = [m(x.to(next(m.parameters()).dtype)) for m in models]
    for key in ("out", "aux"):
        _assert_close(key, outs[0][key].detach(), outs[1][key].detach(), outs[2][key].detach())
    if train:
        for m, out in zip(models, outs):
            (out["out"].square().mean() + out["aux"].square().mean()).backward()
        # With batch statistics over 2 images (the ASPP pooling branch normalises 2 values per
        # channel) most of these fp32 gradients are rounding-dominated in PyTorch too; the
        # final bias's gradient (a mean over the output pixels) was 5.9e-3 off float64 in
        # PyTorch's channels_last model, 1.1e-2 in its NCHW one, 2.9e-2 fused (seeds 1-2:
        # fused 0.8-1.2x channels_last's): bounded by the larger of PyTorch's two
        assert _assert_gradients(*models) == len(list(model.parameters()))
