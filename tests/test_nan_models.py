"""NaN and inf in one image come out of a whole fused model where they come out of PyTorch's:
the same logits are NaN, the same are +-inf, and the other images' logits still match float64
as closely as PyTorch's own (fused_resnet.verify.compare). On a CPU this covers the oneDNN
fast path, whose ReLU post-op would turn NaN into 0 (fused_resnet.ops.conv_mkldnn), in eval
(folded, prepacked) and training (batch statistics), NCHW and channels_last; and a NaN made
inside the network from a finite input (an overflow to inf, then inf - inf or inf * 0). An
NCHW model computes in channels_last from its stem on unless fused with
cpu_channels_last=False ("nchw-kept"), whose NCHW kernels are covered too."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fused_resnet as fr
from conftest import plain_twin, randomise_batchnorms
from fused_resnet.ops import conv_mkldnn
from fused_resnet.verify import compare

MEMORY_FORMATS = [pytest.param(torch.contiguous_format, True, id="nchw"),
                  pytest.param(torch.contiguous_format, False, id="nchw-kept"),
                  pytest.param(torch.channels_last, True, id="nhwc")]


def _models(arch: str, training: bool, memory_format, inside: bool):
    """(fused, PyTorch fp32, PyTorch fp64) copies of one model with non-trivial BNs."""
    torch.manual_seed(0)
    model = randomise_batchnorms(getattr(torchvision.models, arch)(num_classes=10))
    model = model.train(training).to(memory_format=memory_format)
    return (fr.fuse_(copy.deepcopy(model), cpu_channels_last=inside),
            plain_twin(model, cpu_channels_last=inside), copy.deepcopy(model).double())


def _batch(memory_format, special: str) -> torch.Tensor:
    """Four images; image 1 holds a NaN and image 2 an inf ("nan_inf"), or image 1 is finite
    but so large that the convs overflow ("overflow")."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    if special == "nan_inf":
        x[1, 0, 5, 6] = math.nan
        x[2, 2, 20, 9] = math.inf
    else:
        x[1] *= 3e37  # eval: conv sums past fp32's largest value, then inf - inf
    return x.contiguous(memory_format=memory_format)


def _assert_same_non_finite(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got.isnan(), want.isnan()), \
        f"NaN logits: fused {got.isnan().sum(1).tolist()}, PyTorch {want.isnan().sum(1).tolist()}"
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()],
                                                                  want[want.isinf()]), \
        f"inf logits: fused {got.isinf().sum(1).tolist()}, PyTorch {want.isinf().sum(1).tolist()}"


# The overflow case in eval only: in training, where BN normalises over the batch, whether
# the overflowing image's statistics overflow too depends on how they are accumulated
# (PyTorch's CPU BatchNorm in double), which is not what this file tests.
CASES = [pytest.param(False, "nan_inf", id="eval-nan_inf"),
         pytest.param(False, "overflow", id="eval-overflow"),
         pytest.param(True, "nan_inf", id="train-nan_inf")]


@pytest.mark.parametrize("training, special", CASES)
@pytest.mark.parametrize("memory_format, inside", MEMORY_FORMATS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_model_keeps_non_finite_images(arch, memory_format, inside, training, special):
    fused, plain, ref = _models(arch, training, memory_format, inside)
    x = _batch(memory_format, special)
    with torch.no_grad():
        got, want, want64 = fused(x), plain(x), ref(x.double())
    assert not want[1].isfinite().all(), "the case must give PyTorch a non-finite image"
    _assert_same_non_finite(got, want)
    finite = want.isfinite().all(dim=1)
    if not training:  # eval normalises each image alone: the others stay finite and exact
        assert finite.tolist() == [True, False, special == "overflow", True]
    if finite.any():
        c = compare("finite images' logits", got[finite], want64[finite], want[finite])
        assert c.ok, c


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("special", ["nan", "inf_times_zero"])
def test_onednn_conv_relu_keeps_nan(special, residual):
    """The oneDNN fused conv + ReLU alone (the ops' "mkldnn" path, where no caller gives a
    bound): NaN and inf as in torch.relu(conv2d(x) + bias + residual)."""
    if conv_mkldnn.unsupported(torch.empty(1, 1, 1, 1), torch.empty(1, 1, 1, 1)) is not None:
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(2)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    w, bias = torch.randn(16, 8, 3, 3) / 8, torch.randn(16)
    if special == "nan":
        x[0, 1, 2, 3] = math.nan
    else:
        x[0, 1, 2, 3] = math.inf
        w[3, 1] = 0.0  # output channel 3 meets inf * 0 = NaN; the others +-inf
    res = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last) \
        if residual else None
    want = torch.relu(F.conv2d(x, w, bias, 1, 1) + (res if residual else 0))
    got = conv_mkldnn.conv2d_act(x, w, bias, [1, 1], [1, 1], [1, 1], 1, res, relu=True)
    assert not want.isfinite().all()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite])


def test_bound_keeps_the_post_op_for_ordinary_inputs():
    """The guard must not cost the fast path: for ordinary activations and weights the bound is
    far below SAFE_BOUND (so oneDNN's fused ReLU runs), and any NaN or inf operand fails it."""
    x, w, bias = torch.randn(8, 64, 14, 14).relu(), torch.randn(64, 64, 3, 3) / 24, torch.randn(64)
    bound = conv_mkldnn.output_bound(conv_mkldnn.max_abs(x), conv_mkldnn.weight_gain(w),
                                     conv_mkldnn.max_abs(bias), conv_mkldnn.max_abs(x))
    assert conv_mkldnn.keeps_finite(bound)
    assert abs(F.conv2d(x, w, bias, 1, 1) + x).max() <= bound
    for bad in (math.nan, math.inf, -math.inf):
        x_bad = x.clone()
        x_bad[3, 2, 1, 0] = bad
        assert not conv_mkldnn.keeps_finite(conv_mkldnn.output_bound(
            conv_mkldnn.max_abs(x_bad), conv_mkldnn.weight_gain(w), conv_mkldnn.max_abs(bias)))
    w_bad = w.clone()
    w_bad[0, 0, 0, 0] = math.nan
    assert not conv_mkldnn.keeps_finite(conv_mkldnn.output_bound(
        conv_mkldnn.max_abs(x), conv_mkldnn.weight_gain(w_bad), conv_mkldnn.max_abs(bias)))
