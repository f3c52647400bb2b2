"""The GPU path of a fused ResNet-50, rehearsed on fake CUDA tensors (fused_resnet.aot.rehearsal).

One subprocess runs `python -m fused_resnet.aot --rehearse`: ResNet-50 at batch 256, 224x224,
{bf16 autocast, fp32} x {channels_last, NCHW} x {training step, eval}, plus training steps with
the Triton backend forced, every launch recorded instead of run and checked (grid limits, int32
indices, alignment, dtypes, offered paths, fake kernels). It runs without TRITON_INTERPRET
(Triton must compile for sm_90, not interpret) and outside the repository root (from there
`python -m` would import the unbuilt source tree). The tests read its JSON.

Then each check shown able to fail: planted launches and calls (an oversized grid, an int32
overflow, a misaligned channel count or pointer, an fp32 activation in the bf16 model, a kernel
without an index model, a CUTLASS call its plan refuses), and end to end on a small fused model
in this process: an fp32 activation made in a bf16 model and a C++ op without a fake kernel are
reported.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import fused_resnet as fr
from fused_resnet import _extension
from fused_resnet.aot import rehearsal
from fused_resnet.aot.capture import TensorSpec

pytest.importorskip("triton")

BF16 = rehearsal.Combination("bf16", "channels_last", "train")
FP32 = rehearsal.Combination("fp32", "nchw", "eval")


def _with_cuda() -> bool:
    return _extension.available() and bool(_extension.load().with_cuda)


def _with_cutlass() -> bool:
    return _extension.available() and bool(getattr(_extension.load(), "with_cutlass", 0))


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
    """One run of the whole rehearsal (about 30 s of CPU time: 10 model runs on fake tensors)."""
    out = tmp_path_factory.mktemp("rehearsal")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fused_resnet.aot", "--rehearse", "--out",
                          str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=out)
    assert (out / "rehearsal.json").exists(), run.stdout[-4000:] + run.stderr[-4000:]
    with open(out / "rehearsal.json") as f:
        return {"run": run, "result": json.load(f), "out": out}


def _rows(rehearsed, key):
    return rehearsed["result"][key]


def _combinations(row) -> set:
    return set(row["combinations"])


# ---- the rehearsal of ResNet-50 at batch 256 ---------------------------------------------------
def test_every_check_passes(rehearsed):
    problems = rehearsed["result"]["problems"]
    assert not problems, json.dumps(problems[:40], indent=1)
    assert rehearsed["run"].returncode == 0, rehearsed["run"].stdout[-3000:]


def test_every_combination_ran(rehearsed):
    """The 8 combinations and the Triton backend's training steps, each with op calls; every
    training step with launches of the statistics merge (the Triton conv's epilogue
    statistics) and, where _C has the CUDA kernels, the C++ BN kernels."""
    summary = rehearsed["result"]["summary"]
    expected = [str(c) for c in rehearsal.COMBINATIONS + rehearsal.TRITON_BACKEND_COMBINATIONS]
    assert list(summary) == expected
    assert len(rehearsal.COMBINATIONS) == 8
    for name, entry in summary.items():
        assert entry["op_calls"] > 50, (name, entry)
        assert "_conv_kernel" in entry["kernels"], (name, entry["kernels"])
        if name.startswith("train"):  # backward ran: the convs' and the BN's
            backward = {"aten.convolution_backward", "bn_add_relu_grad_apply_triton",
                        "bn_add_relu_grad_apply_cpp"}
            assert "aten.convolution_backward" in entry["ops"] and \
                len(backward & set(entry["ops"] + entry["native_ops"])) == 2, (name, entry)


def test_every_launch_a_real_step_can_make_is_recorded(rehearsed):
    """auto backend: the Triton conv (every tile config) and its statistics merge, the C++ BN
    kernels and the CUTLASS conv; Triton backend: its four BN pieces' kernels too."""
    summary = rehearsed["result"]["summary"]
    auto = summary[str(BF16)]
    assert {"_conv_kernel", "_stats_final_kernel"} <= set(auto["kernels"])
    if _with_cuda():
        assert {"bn_stats_cpp", "bn_add_relu_apply_cpp", "bn_add_relu_grad_reduce_cpp",
                "bn_add_relu_grad_apply_cpp"} <= set(auto["native_ops"]), auto["native_ops"]
    if _with_cutlass():
        assert "conv2d_bias_act_cutlass" in auto["native_ops"]
    triton = summary[str(rehearsal.TRITON_BACKEND_COMBINATIONS[0])]
    assert set(rehearsal.KERNEL_MODELS) == set(triton["kernels"]), triton["kernels"]
    assert triton["native_ops"] == []


def test_conv_paths_offered_and_refused_with_reasons(rehearsed):
    """Every conv op offers the library and Triton convs, both able to run; the CUTLASS conv
    (built) runs in bf16, is refused in fp32 for its dtype, and the BN + ReLU + conv op does
    not offer it (its fp16-only prologue: ops/bn_relu_conv.py)."""
    convs = [row for row in _rows(rehearsed, "calls") if row["offered"]
             and not any("backend=" in c for c in row["combinations"])]
    assert {"conv2d_epilogue", "conv2d_bn_stats", "bn_relu_conv2d_bn_stats"} <= \
        {row["op"] for row in convs}
    for row in convs:
        offered, bf16 = row["offered"], all("bf16" in c for c in row["combinations"])
        assert offered["library"] is None and offered["triton"] is None, row
        if row["op"] == "bn_relu_conv2d_bn_stats":
            assert "does not offer" in offered["cutlass"], row
        elif not _with_cutlass():
            assert "without the CUTLASS" in offered["cutlass"], row
        elif bf16:
            assert offered["cutlass"] is None, row
        else:  # fp32 (the dual op leaves out what cutlass_unsupported refuses)
            assert "dtype" in offered["cutlass"] or "does not offer" in offered["cutlass"], row


def test_every_tile_config_of_a_conv_is_launched(rehearsed):
    """The tuner's candidates are all recorded: the stem's statistics conv in a bf16 training
    step launches several (BLOCK_M, BLOCK_N) tiles."""
    stem = [row for row in _rows(rehearsed, "launches") if row["kernel"] == "_conv_kernel"
            and row["constexprs"]["KH"] == 7 and row["constexprs"]["STATS"]
            and str(BF16) in row["combinations"]]
    tiles = {(row["constexprs"]["BLOCK_M"], row["constexprs"]["BLOCK_N"]) for row in stem}
    assert len(tiles) >= 2, tiles


def test_cutlass_calls_carry_their_plan_and_grid(rehearsed):
    if not _with_cutlass():
        pytest.skip("_C built without the CUTLASS conv")
    cutlass = [row for row in _rows(rehearsed, "calls") if row["op"] == "conv2d_bias_act_cutlass"]
    assert cutlass
    for row in cutlass:
        plan, grid = row["native"]["cutlass_plan"], row["native"]["grid"]
        assert plan["unsupported"] is None and plan["padded_c"] % 8 == 0, row
        assert grid[1] <= 65535 and grid[0] >= 1, row
    stem = [row for row in cutlass if row["args"][0].startswith("bf16 256x3x224x224")]
    assert stem and all(row["native"]["cutlass_plan"]["padded_c"] == 8 for row in stem)
    # 256*112*112 output pixels in 128-row tiles, 64 channels in one 128-wide tile
    assert stem[0]["native"]["grid"] == [256 * 112 * 112 // 128, 1, 1]


def test_int32_headroom_at_batch_256(rehearsed):
    """The largest int32 index each kernel computes, from the recorded launches: the Triton
    conv's input pixel index reaches N*H*W - 1 of the stem's 256x224x224 input, far below 2^31."""
    rows = {(row["kernel"], row["index"]): row["largest"] for row in _rows(rehearsed, "int32")}
    assert rows[("_conv_kernel", "input pixel (img*H + ih)*W + iw")] == 256 * 224 * 224 - 1
    assert max(rows.values()) < 2**31 - 1


def test_dtypes_after_autocast(rehearsed):
    """bf16 under autocast: conv activations and weights bf16, the statistics fp32 (checked for
    every call by the dtype check; here shown on the conv with statistics)."""
    stats = [row for row in _rows(rehearsed, "calls") if row["op"] == "conv2d_bn_stats"
             and str(BF16) in row["combinations"]]
    assert stats
    for row in stats:
        assert row["args"][0].startswith("bf16") and row["args"][1].startswith("bf16"), row
        z, mean, var = row["outputs"]
        assert z.startswith("bf16") and mean.startswith("fp32 ") and var.startswith("fp32 ")


def test_markdown_report(rehearsed):
    text = (rehearsed["out"] / "rehearsal.md").read_text()
    for section in ("## Problems: none", "## int32 indices", "## Op calls", "## Triton launches"):
        assert section in text
    assert "| conv2d_bias_act_cutlass |" in text or not _with_cutlass()


def test_every_cpp_kernel_op_has_a_fake_kernel():
    """Every op fused_resnet._C defines (the C++ BN pieces, the CUTLASS convs) can run on fake
    tensors: torch.compile, torch.export and the rehearsal trace through it."""
    from torch._library.custom_ops import OPDEFS

    if not _extension.available():
        pytest.skip(f"no _C: {_extension.error()}")
    names = [name for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("fused_resnet::") and name not in OPDEFS]
    assert any(name.endswith("_cpp") for name in names), names
    for name in names:
        op = getattr(torch.ops.fused_resnet, name.split("::")[1]).default
        assert rehearsal._has_fake(op), name


def test_python_backward_matches_the_autograd_engine():
    """rehearsal.backward (the engine needs a CUDA context for CUDA tensors) computes what
    loss.backward() does: a fused ResNet-18 training step on the CPU, real tensors, whose graph
    holds the fused ops' autograd Functions (statistics outputs without gradients, non-tensor
    inputs) and C++ nodes; every parameter's gradient equal."""
    torch.manual_seed(0)
    model = fr.fuse_(torchvision.models.resnet18(num_classes=10)).train()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])

    def loss():
        return torch.nn.functional.cross_entropy(model(x), target)

    loss().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with rehearsal.remembering_function_inputs():
        rehearsal.backward(loss())
    # exact: the same kernels on the same operands, and a gradient here sums at most two
    # contributions (a block's input feeds its first conv and its shortcut): a + b == b + a
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=0, msg=name)


# ---- each check can fail ------------------------------------------------------------------------
def _spec(shape, dtype=torch.bfloat16, channels_last=False, offset=0):
    t = torch.empty(shape, device="meta")
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return TensorSpec(tuple(shape), t.stride(), dtype, offset)


def _conv_launch(n=256, c_in=64, h=56, w=56, c_out=64, k=3, block_k=64, small_c_in=0,
                 dtype=torch.bfloat16, x_offset=0, grid=None):
    """A launch of kernels/conv.py's _conv_kernel as conv2d_nhwc makes it (3x3, pad 1)."""
    x = _spec((n, c_in, h, w), dtype, True, x_offset)
    out = _spec((n, c_out, h, w), dtype, True)
    args = {"x_ptr": x, "w_ptr": _spec((k, k, c_in, c_out), dtype), "x2_ptr": x,
            "w2_ptr": _spec((k, k, c_in, c_out), dtype), "out_ptr": out, "scale_ptr": out,
            "bias_ptr": out, "res_ptr": out, "tile_mean_ptr": out, "tile_m2_ptr": out,
            "pscale_ptr": out, "pshift_ptr": out, "N": n, "H": h, "W": w, "C_in": c_in,
            "OH": h, "OW": w, "C_out": c_out, "H2": 1, "W2": 1, "C2": 1, "stride": 1, "pad": 1,
            "stride2": 1, "KH": k, "KW": k, "HAS_SHORTCUT": False, "HAS_SCALE": False,
            "HAS_BIAS": False, "HAS_RESIDUAL": False, "RELU": True, "STATS": False,
            "DOT_PRECISION": "tf32", "SMALL_C_IN": small_c_in, "PROLOGUE": False,
            "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": block_k, "GROUP": 8}
    tiles = -(-n * h * w // 128) * -(-c_out // 64)
    return rehearsal.KernelLaunch("_conv_kernel", grid or (tiles,), args,
                                  f"{BF16} | planted")


def _checks(problems) -> set:
    return {p.check for p in problems}


def test_a_valid_planted_launch_passes():
    """The planted launches below differ from this one in one thing each."""
    assert rehearsal.launch_problems(_conv_launch(), BF16) == []


@pytest.mark.parametrize("grid", [(2**31,), (1, 65536), (1, 1, 70000), (0,)])
def test_grid_outside_cuda_limits_is_reported(grid):
    found = rehearsal.launch_problems(_conv_launch(grid=grid), BF16)
    assert _checks(found) == {"grid"}, found


def test_int32_overflow_is_reported():
    """Batch 4096 of 1024x1024 images: 2^32 pixels, the conv's int32 pixel index wraps (the
    launcher refuses such a shape; a planted launch shows the check would too)."""
    found = rehearsal.launch_problems(_conv_launch(n=4096, h=1024, w=1024, c_in=8, c_out=8,
                                                   small_c_in=8), BF16)
    assert _checks(found) == {"int32"}, found
    assert any("input pixel" in p.detail for p in found), found


def test_misaligned_channel_count_is_reported():
    """C_in = 12: channel runs are not whole 16-byte vectors (the launcher pads to 8)."""
    found = rehearsal.launch_problems(_conv_launch(c_in=12, small_c_in=12), BF16)
    assert _checks(found) == {"alignment"}, found


def test_broken_multiple_of_hint_is_reported():
    """C_in = 96 with BLOCK_K = 64 on the SMALL_C_IN == 0 path: tl.multiple_of(k0 % C_in,
    BLOCK_K) would be false, a wrong result on a GPU."""
    found = rehearsal.launch_problems(_conv_launch(c_in=96, block_k=64), BF16)
    assert any("multiple_of" in p.detail for p in found), found


def test_misaligned_pointer_is_reported():
    found = rehearsal.launch_problems(_conv_launch(x_offset=3), BF16)
    assert _checks(found) == {"alignment"}, found


def test_fp32_tensor_in_a_bf16_launch_is_reported():
    found = rehearsal.launch_problems(_conv_launch(dtype=torch.float32), BF16)
    assert _checks(found) == {"dtype"}, found
    assert rehearsal.launch_problems(_conv_launch(dtype=torch.float32), FP32) == []


def test_kernel_without_an_index_model_is_reported():
    launch = rehearsal.KernelLaunch("_new_kernel", (1,), {}, f"{BF16} | planted")
    assert _checks(rehearsal.launch_problems(launch, BF16)) == {"int32"}


def test_call_dtypes_are_checked():
    """An fp32 activation into a fused op of the bf16 model; bf16 statistics out of one."""
    call = rehearsal.Call("conv2d_bn_stats", (_spec((256, 64, 56, 56), torch.float32, True),
                                              _spec((64, 64, 3, 3))),
                          (_spec((256, 64, 56, 56)), _spec((64,)), _spec((64,))),
                          f"{BF16} | planted")
    details = [p.detail for p in rehearsal.call_problems(call, BF16)]
    assert len(details) == 3 and all("expected" in d for d in details), details


@pytest.mark.skipif(not _with_cutlass(), reason="_C built without the CUTLASS conv")
def test_cutlass_call_its_plan_refuses_is_reported():
    """C_out = 12: not a multiple of 8, which CUTLASS's 128-bit stores need."""
    x, w = _spec((2, 16, 8, 8), channels_last=True), _spec((12, 16, 3, 3))
    native = rehearsal.cutlass_launch(x, w, 1, 1)
    assert native["cutlass_plan"]["unsupported"]
    call = rehearsal.Call("conv2d_bias_act_cutlass", (x, w, 1, 1, _spec((12,), torch.float32),
                                                      None, True), (), f"{BF16} | planted",
                          native=native)
    assert _checks(rehearsal.call_problems(call, BF16)) == {"path"}


# ---- end to end, in this process (the Triton conv is refused here: TRITON_INTERPRET) -----------
def _small_fused_resnet(layout):
    with torch.device("cuda"):
        model = torchvision.models.resnet18(num_classes=10)
    return fr.fuse_(rehearsal.in_layout(model, layout))


class _LeaksFp32(torch.nn.Module):
    """A fused ResNet-18 whose stem output is cast to fp32: under autocast, an fp32 activation."""

    def __init__(self, layout):
        super().__init__()
        self.net = _small_fused_resnet(layout)

    def forward(self, x):
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x)))).float()
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = stage(x)
        return net.fc(torch.flatten(net.avgpool(x), 1))


def test_small_model_rehearses_cleanly():
    """The control of the two tests below: the same small fused model, nothing reported."""
    result = rehearsal.rehearse([rehearsal.Combination("bf16", "channels_last", "eval")],
                                batch=2, image_size=64, build=_small_fused_resnet)
    assert result.all_problems() == []
    assert result.calls


def test_fp32_activation_made_in_a_bf16_model_is_reported():
    result = rehearsal.rehearse([rehearsal.Combination("bf16", "channels_last", "eval")],
                                batch=2, image_size=64, build=_LeaksFp32)
    found = [p for p in result.all_problems() if p.check == "dtype"]
    assert any("made an fp32 activation [2, 64, 16, 16]" in p.detail for p in found), found


@pytest.mark.skipif(not _with_cutlass(), reason="_C built without the CUTLASS conv")
def test_cpp_op_without_a_fake_kernel_is_reported(monkeypatch):
    """The CUTLASS conv as if it had no fake kernel: reported, and answered from its plan."""
    has_fake = rehearsal._has_fake
    monkeypatch.setattr(rehearsal, "_has_fake", lambda func: "cutlass" not in str(func)
                        and has_fake(func))
    result = rehearsal.rehearse([rehearsal.Combination("bf16", "channels_last", "eval")],
                                batch=2, image_size=64, build=_small_fused_resnet)
    found = [p for p in result.all_problems() if p.check == "fake"]
    assert found and all("conv2d_bias_act_cutlass" in p.detail for p in found), found


def _raises(*args):
    raise RuntimeError("planted failure")


def _float32_output(input, weight, stride, padding, bias, residual, relu):
    return torch.nn.functional.conv2d(input, weight, None, stride, padding).float()


@pytest.mark.skipif(not _with_cutlass(), reason="_C built without the CUTLASS conv")
@pytest.mark.parametrize("planted, reported", [(_raises, "was offered and raised RuntimeError"),
                                               (_float32_output, "the library path")])
def test_offered_path_that_fails_or_differs_is_reported(monkeypatch, planted, reported):
    """The CUTLASS candidate of conv2d_epilogue raising, or returning fp32 where the library
    path returns bf16: a path the dispatcher would offer on a GPU and that cannot serve."""
    from fused_resnet.ops import conv as conv_ops

    monkeypatch.setattr(conv_ops, "_epilogue_cutlass", planted)
    result = rehearsal.rehearse([rehearsal.Combination("bf16", "channels_last", "eval")],
                                batch=2, image_size=64, build=_small_fused_resnet)
    found = [p for p in result.all_problems() if p.check == "path"]
    assert found and all(reported in p.detail and "cutlass" in p.detail for p in found), found
