"""Custom ops of the fused convolution:

    conv2d_epilogue(input, weight, stride, padding, dilation, groups, scale?, bias?, residual?,
                    relu) -> out
        relu(conv2d(input, weight) * scale + bias + residual), scale/bias per output channel
        (eval-mode BN folded, fused_resnet.fold), each part optional. Inference; also
        differentiable (frozen-BN fine-tuning): backward keeps the output for the ReLU mask
        and runs the conv backward through aten.convolution_backward.
    conv2d_dual_epilogue(input, weight, stride, padding, shortcut_input, shortcut_weight,
                         shortcut_stride, bias?, relu) -> out
        relu(conv2d(input, weight) + conv1x1(shortcut_input, shortcut_weight, stride) + bias):
        a bottleneck's last 1x1 and its projection shortcut W_s a[l] (scales folded into both
        weights) as one GEMM. Inference.
    conv2d_bn_stats(input, weight, stride, padding, dilation, groups) -> (z, mean, var)
        the raw conv output and its per-channel batch mean / biased variance (fp32), computed in
        the conv's epilogue on the Triton path: training-mode BN without a second read of z.
        Differentiable w.r.t. input and weight (the conv backward: library_conv_backward);
        the statistics are consumed by bn_add_relu's batch_mean/batch_var, whose backward
        already differentiates through them.

Each runs the Triton implicit-GEMM kernel (kernels/conv.py), the library conv (cuDNN /
oneDNN; for conv2d_bn_stats on a CPU, library_conv: a 1x1 conv over few pixels as one MKL
GEMM) followed by the fused epilogue pieces of bn_add_relu ("library" path), or, for
conv2d_epilogue on CUDA in fp16/bf16, the CUTLASS implicit-GEMM conv with the epilogue in its
tile (csrc/cutlass_conv/, "cutlass" path). Which one: see conv_path and choose_path. Output layout follows the input's (channels_last in, channels_last out).
"""

import contextlib
import functools
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_resnet import _extension, backend, devices, layout, tuning, weight_cache
from fused_resnet.compare import conv_agreement
from fused_resnet.ops import conv_mkldnn, eager
from fused_resnet.ops.bn_add_relu import _run


def _conv_kernels():
    from fused_resnet.kernels import conv  # imports triton: only when that path runs
    return conv


def triton_unsupported(input, weight, stride, padding, dilation, groups) -> Optional[str]:
    """Why the Triton conv cannot run this configuration (None if it can)."""
    if groups != 1:
        return "grouped convolution"
    if list(dilation) != [1, 1]:
        return "dilation"
    if stride[0] != stride[1] or padding[0] != padding[1]:
        return "non-square stride or padding"
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {input.dtype}"
    if weight.dtype != input.dtype:
        return "weight dtype differs from input dtype"
    if input.dtype == torch.bfloat16 and input.device.type == "cpu":
        return ("bfloat16 under Triton's CPU interpreter (its tl.dot multiplies the raw bf16 "
                "bits: triton-lang/triton#11584)")
    n, _, oh, ow = _conv_out_shape(input, weight, stride, padding, dilation)
    if not layout.fits_int32_pixel_index(*_pixels(input)) or \
            not layout.fits_int32_pixel_index(n, oh * ow):
        return "2^31 pixels or more (the kernel's pixel index is int32)"
    return None


def _pixels(t):
    """(N, H*W) of an NCHW-shaped tensor."""
    return t.shape[0], t.shape[2] * t.shape[3]


def cutlass_unsupported(input, weight, stride, padding, dilation, groups) -> Optional[str]:
    """Why the CUTLASS conv cannot run this configuration (None if it can). The sizes are
    judged by _C.cutlass_conv_plan (csrc/common/cutlass_conv_plan.h), the rule the op itself
    applies. Storage alignment is not a reason: the op copies an operand whose address is not
    aligned for CUTLASS's vector accesses (a view with an odd storage offset) before launching
    (cutlass_operand_info in the same header)."""
    if not _extension.available() or not getattr(_extension.load(), "with_cutlass", 0):
        return "fused_resnet._C was built without the CUTLASS conv kernels"
    if input.device.type != "cuda":
        return "the CUTLASS conv runs on CUDA devices only"
    if weight.device != input.device:
        return f"weight on {weight.device}, input on {input.device}"
    if input.dim() != 4 or weight.dim() != 4:
        return "input and weight must be 4-D"
    if input.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != input.dtype:
        return f"dtype {input.dtype} (float16 or bfloat16 input and weight)"
    if stride[0] != stride[1] or padding[0] != padding[1] or list(dilation) != [1, 1] \
            or groups != 1:
        return "grouped, dilated, or non-square stride or padding"
    n, c, h, w = input.shape
    k, _, r, s = weight.shape
    reason, *_ = _extension.load().cutlass_conv_plan(n, h, w, c, k, r, s, stride[0],
                                                     padding[0], 1, 1, 2)
    return reason


_forced_path: Optional[str] = None
PATHS = ("library", "triton", "cutlass", "mkldnn")


@contextlib.contextmanager
def use_path(name: str):
    """Force the conv implementation inside a `with` block (benchmarks, tests): "library",
    "triton" or "cutlass". An op that cannot run it raises, naming the reason."""
    global _forced_path
    if name not in PATHS:
        raise ValueError(f"fused_resnet: unknown conv path {name!r}; expected one of {PATHS}")
    previous, _forced_path = _forced_path, name
    try:
        yield
    finally:
        _forced_path = previous


CONV_PATHS_ENV = "FUSED_RESNET_CONV_PATHS"


def allowed_paths() -> Optional[frozenset]:
    """The conv paths the ops may choose from: FUSED_RESNET_CONV_PATHS, comma-separated names
    of PATHS (e.g. "library,cutlass" to keep the Triton conv out), or None when unset (all).
    It narrows the automatic choice only (use_path and a forced backend still say exactly what
    runs); an op none of whose allowed paths can run a convolution runs the library path,
    which every op has."""
    return _parse_paths(os.environ.get(CONV_PATHS_ENV, ""))


@functools.lru_cache(maxsize=8)
def _parse_paths(value: str) -> Optional[frozenset]:
    names = {name.strip() for name in value.split(",") if name.strip()}
    if not names:
        return None
    unknown = sorted(names - set(PATHS))
    if unknown:
        raise ValueError(f"fused_resnet: {CONV_PATHS_ENV}={value!r} names unknown conv path(s) "
                         f"{', '.join(unknown)}; known: {', '.join(PATHS)}")
    return frozenset(names)


def _forced(candidates, input, weight, stride, padding, dilation, groups) -> str:
    if _forced_path not in candidates:
        raise RuntimeError(f"fused_resnet: conv path {_forced_path!r} was forced but this op "
                           f"offers only {sorted(candidates)}")
    why = why_path_cannot_run(_forced_path, input, weight, stride, padding, dilation, groups)
    if why is not None:
        raise RuntimeError(f"fused_resnet: conv path {_forced_path!r} was forced but cannot run "
                           f"this convolution: {why}")
    return _forced_path


def conv_path(input, weight, stride, padding, dilation, groups, cutlass: bool = False,
              mkldnn: bool = False) -> str:
    """"triton" (fused implicit-GEMM conv), "cutlass" (the CUTLASS fused conv; only where the
    caller offers it), "mkldnn" (oneDNN's fused conv on CPU; only where the caller offers it)
    or "library" (library conv + fused epilogue), when the caller has no measured choice to
    offer (see choose_path).

    Forced backends: triton -> the Triton conv wherever it supports the configuration (its
    epilogue kernels otherwise); cpp (cuda) -> the CUTLASS conv where offered and supported,
    else library conv + the C++ epilogue; torch -> library conv + the reference epilogue.
    auto: on CPU oneDNN's fused conv where offered and usable (see ops.conv_mkldnn), else the
    library conv (cuDNN / mkldnn) + the C++ epilogue; on CUDA choose_path may pick the Triton
    or CUTLASS conv instead after measuring them.
    """
    backend.choose(input.device, input.dtype)  # raises if a forced backend cannot run here
    requested = backend.requested()  # read once: every conv op call asks
    if requested == "auto" and mkldnn and conv_mkldnn.unsupported(input, weight) is None:
        return "mkldnn"
    if requested == "triton":
        unsupported = triton_unsupported(input, weight, stride, padding, dilation, groups)
        return "triton" if unsupported is None else "library"
    if requested == "cpp" and cutlass and \
            cutlass_unsupported(input, weight, stride, padding, dilation, groups) is None:
        return "cutlass"
    return "library"


def mkldnn_chosen(input: Tensor, weight: Tensor, dtype: Optional[torch.dtype] = None,
                  residual: bool = False) -> bool:
    """Whether the ops would run oneDNN's fused conv (the "mkldnn" path) on this input: CPU,
    the auto backend (or the path forced by use_path) and oneDNN able to run it. A caller that
    holds prepacked weights (the fused modules, in inference) then calls ops.conv_mkldnn
    itself with them. dtype: the one both operands are cast to first (autocast), if any;
    residual: whether a residual is added."""
    if input.device.type != "cpu" or \
            conv_mkldnn.unsupported(input, weight, dtype, residual) is not None:
        return False
    if _forced_path is not None:
        return _forced_path == "mkldnn"
    allowed = allowed_paths()
    return backend.requested() == "auto" and (allowed is None or "mkldnn" in allowed)


def why_path_cannot_run(name: str, input, weight, stride, padding, dilation,
                        groups) -> Optional[str]:
    """None if conv path `name` can run this configuration on input's device, else why."""
    if name == "triton":
        return backend.why_not("triton", input.device.type) or triton_unsupported(
            input, weight, stride, padding, dilation, groups)
    if name == "cutlass":
        return cutlass_unsupported(input, weight, stride, padding, dilation, groups)
    if name == "mkldnn":
        return conv_mkldnn.unsupported(input, weight)
    return None


def _runnable(candidates: dict, input, weight, stride, padding, dilation, groups) -> dict:
    """The candidates that can run this configuration here."""
    return {name: fn for name, fn in candidates.items()
            if why_path_cannot_run(name, input, weight, stride, padding, dilation, groups) is None}


def choose_path(op: str, candidates: dict, input, weight, stride, padding, dilation,
                groups, epilogue: tuple = ()) -> str:
    """The path to run: conv_path's answer, or on CUDA with the auto backend, the fastest of
    the candidates that can run this op and shape (and that FUSED_RESNET_CONV_PATHS allows:
    allowed_paths), measured once and cached in memory and on disk (like cudnn.benchmark; see
    fused_resnet.tuning). On CUDA a path other than the library conv is used only once it
    agreed with the library conv on this process's input of this shape (see trusted).

    epilogue: (name, value) pairs describing whatever else the op computes (epilogue flags,
    the shortcut's geometry): part of the key, so two convs of equal shapes but different
    epilogues are measured and checked apart."""
    allowed = allowed_paths()
    offered = candidates if allowed is None else \
        {name: fn for name, fn in candidates.items() if name in allowed}
    if not tuning.measured_on(input.device):  # nothing to measure or to check: by rule
        if _forced_path is not None:
            return _forced(candidates, input, weight, stride, padding, dilation, groups)
        return conv_path(input, weight, stride, padding, dilation, groups,
                         cutlass="cutlass" in offered, mkldnn="mkldnn" in offered)
    key = choice_key(op, input, weight, stride, padding, dilation, groups, epilogue, allowed)
    if _forced_path is not None:
        return trusted(op, key, _forced(candidates, input, weight, stride, padding, dilation,
                                        groups), candidates, input, forced=True)
    if backend.requested() != "auto":
        return trusted(op, key, conv_path(input, weight, stride, padding, dilation, groups,
                                          cutlass="cutlass" in candidates), candidates, input)
    choice = tuning.cached(key, offered)
    if choice is not None:  # measured in this process, or remembered from an earlier one
        return trusted(op, key, choice, candidates, input)
    runnable = _runnable(offered, input, weight, stride, padding, dilation, groups)
    if len(runnable) == 1:
        return trusted(op, key, next(iter(runnable)), candidates, input)
    if not runnable or not tuning.can_measure():
        return conv_path(input, weight, stride, padding, dilation, groups)
    with devices.on_device(input):  # run and time on the input's GPU
        # the library conv is the reference of the check even where it is not allowed to win
        reference = {"library": candidates["library"]} if "library" in candidates else {}
        checked = agreeing(op, key, {**reference, **runnable})
        kept = {name: fn for name, fn in checked.items() if name in runnable}
        if not kept:  # every allowed path disagreed (agreeing warned): the reference runs
            return "library"
        return tuning.tuned_choice(key, kept, persist=True, describe=lambda: _describe(key),
                                   left_out=set(runnable) - set(kept))


def choice_key(op: str, input, weight, stride, padding, dilation, groups, epilogue: tuple = (),
               allowed: Optional[frozenset] = None) -> tuple:
    """What a measured path choice is made for: the op, device, dtype, shapes, layout, conv
    arguments, the epilogue's description and, when FUSED_RESNET_CONV_PATHS narrows the
    candidates, the allowed paths (a choice among fewer paths is its own)."""
    key = (op, input.device.index, input.dtype, tuple(input.shape),
           layout.is_channels_last(input), tuple(weight.shape), tuple(stride), tuple(padding),
           tuple(dilation), groups, tuple(epilogue))
    return key if allowed is None else key + (("paths", ",".join(sorted(allowed))),)


def _describe(key: tuple) -> str:
    """A choice key as one readable line (the tuner's progress line)."""
    op, _, dtype, shape, channels_last, weight, stride, padding, dilation, groups, epilogue = \
        key[:11]
    parts = [op, str(dtype).removeprefix("torch."), "x" + "x".join(map(str, shape)),
             "channels_last" if channels_last else "nchw", "w" + "x".join(map(str, weight)),
             f"stride {list(stride)}", f"padding {list(padding)}"]
    if list(dilation) != [1, 1] or groups != 1:
        parts.append(f"dilation {list(dilation)} groups {groups}")
    parts += [f"{name}={value}" for name, value in epilogue + key[11:]
              if value not in (None, False)]
    return " ".join(parts)


# (choice key, path) -> whether that path agreed with the library conv in this process
_agreed: dict = {}


def trusted(op: str, key, path: str, candidates: dict, input, forced: bool = False) -> str:
    """`path`, if it can be trusted here: on CUDA, a path other than the library conv that has
    not yet agreed with the library conv in this process (a forced backend's CUTLASS conv, a
    choice remembered on disk from another process) is checked once per shape first. One that
    disagrees gives way to the library conv, with a warning (forced=True: use_path forced it
    by name, which then raises instead); during CUDA-graph capture, where nothing can be
    checked, an unchecked path gives way too."""
    if path == "library" or not tuning.measured_on(input.device) or \
            "library" not in candidates:
        return path
    if (key, path) not in _agreed:
        if not tuning.can_measure():
            return "library"
        with devices.on_device(input):
            agreeing(op, key, {"library": candidates["library"], path: candidates[path]})
    if _agreed[(key, path)]:
        return path
    if forced:
        raise RuntimeError(f"fused_resnet: conv path {path!r} was forced but its {op} output "
                           f"disagrees with the library conv for input {tuple(input.shape)}")
    return "library"


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def agreeing(op: str, key, candidates: dict) -> dict:
    """The candidates whose output agrees with the library path's on this very input (each
    run once before the timing): a kernel that never ran on this GPU before must not win the
    measurement by being fast and wrong. A disagreeing one (or one that fails) is left out for
    this shape, with a warning that names it; every verdict is remembered for `key`. Agreeing
    means: in the normwise error over the whole output, in every 64 x 64 tile of it, in each
    channel's batch statistics, and with NaN/inf in the same places (compare.conv_agreement)."""
    if "library" not in candidates:
        return candidates
    reference = _as_tuple(candidates["library"]())
    kept = {"library": candidates["library"]}
    for name, fn in candidates.items():
        if name == "library":
            continue
        try:
            got = _as_tuple(fn())
        except Exception as exc:  # noqa: BLE001 - a path that cannot run here is left out
            warnings.warn(f"fused_resnet: {op} on the {name} path failed ({type(exc).__name__}: "
                          f"{exc}); it is not used for this shape", RuntimeWarning,
                          stacklevel=2)
            _agreed[(key, name)] = False
            continue
        verdict = conv_agreement(got, reference)
        _agreed[(key, name)] = verdict.ok
        if verdict.ok:
            kept[name] = fn
        else:
            warnings.warn(f"fused_resnet: {op} on the {name} path disagrees with the library "
                          f"conv ({verdict}); it is not used for this shape", RuntimeWarning,
                          stacklevel=2)
    return kept


def _output_like(out: Tensor, input: Tensor) -> Tensor:
    return out.contiguous(memory_format=layout.kernel_format(input))


def _affine(out_channels, scale, bias, like):
    """Per-channel scale and bias in the epilogue's arithmetic dtype (fp32; fp64 for fp64), for
    kernels that take both: an absent one is a shared constant vector of ones / zeros (kept
    per size, dtype and device), not a new allocation per call."""
    acc = layout.accumulate_dtype(like)
    return (scale.to(acc) if scale is not None else
            weight_cache.constant(1.0, out_channels, acc, like),
            bias.to(acc) if bias is not None else
            weight_cache.constant(0.0, out_channels, acc, like))


def _in_accumulate_dtype(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """t in like's epilogue arithmetic dtype; None stays None (for kernels that skip an absent
    scale or bias)."""
    return t.to(layout.accumulate_dtype(like)) if t is not None else None


def _conv_out_shape(input, weight, stride, padding, dilation):
    n, _, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, c_out, oh, ow


def _empty_conv_out(input, weight, stride, padding, dilation):
    return torch.empty(_conv_out_shape(input, weight, stride, padding, dilation),
                       dtype=input.dtype, device=input.device,
                       memory_format=layout.kernel_format(input))


def allows_tf32() -> bool:
    """Whether PyTorch lets cuDNN run fp32 convs on TF32 tensor cores (the Triton conv, which
    stands in for them, follows the same setting). torch >= 2.9 has a per-operator
    fp32_precision API ("none" defers to the backend's, then the global setting); reading the
    legacy allow_tf32 flags once it was used raises, so it is read first."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is None or not hasattr(torch.backends, "fp32_precision"):
        return bool(cudnn.allow_tf32)  # older torch: the legacy flag only
    for precision in (conv.fp32_precision, cudnn.fp32_precision,
                      torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


# ---- conv2d_epilogue ----------------------------------------------------------------------------
def _epilogue_triton(input, weight, stride, padding, scale, bias, residual, relu):
    conv = _conv_kernels()
    # The kernel skips what is absent (eval: the BN scale is folded into the weight).
    out, _ = conv.conv2d_nhwc(input, conv.pack_weight(weight), stride[0], padding[0],
                              scale=_in_accumulate_dtype(scale, input),
                              bias=_in_accumulate_dtype(bias, input), residual=residual,
                              relu=relu, allow_tf32=allows_tf32())
    return _output_like(out, input)


def _epilogue_library(input, weight, stride, padding, dilation, groups, scale, bias, residual,
                      relu):
    z = _output_like(F.conv2d(input, weight, None, stride, padding, dilation, groups), input)
    scale_f, bias_f = _affine(weight.shape[0], scale, bias, z)
    out, _ = _run("bn_add_relu_apply", z, z, residual, scale_f, bias_f, relu, False)
    return out


def _epilogue_mkldnn(input, weight, stride, padding, dilation, groups, bias, residual, relu):
    return conv_mkldnn.conv2d_act(input, weight, _in_accumulate_dtype(bias, input), stride,
                                  padding, dilation, groups, residual, relu)


def _cutlass_weight(weight: Tensor) -> Tensor:
    """The weight as the CUTLASS op reads it (KRSC: channels_last, dense), made once per state
    of the weight (fused_resnet.weight_cache) so the op copies nothing per call. (The stem's
    C_in = 3 weight is still zero-padded to 8 by the op, a copy of a few kilobytes.)"""
    return weight_cache.derived(
        weight, "cutlass_krsc", lambda: weight.contiguous(memory_format=torch.channels_last))


def _epilogue_cutlass(input, weight, stride, padding, bias, residual, relu):
    _, bias_f = _affine(weight.shape[0], None, bias, input)
    if residual is not None:
        residual = residual.to(input.dtype)
    out = torch.ops.fused_resnet.conv2d_bias_act_cutlass(input, _cutlass_weight(weight),
                                                         stride[0], padding[0], bias_f, residual,
                                                         relu)
    return _output_like(out, input)


def _cutlass_out(input, weight, stride: int, padding: int):
    """What the CUTLASS ops return: the conv output, channels_last, in the input's dtype."""
    return torch.empty(_conv_out_shape(input, weight, [stride] * 2, [padding] * 2, [1, 1]),
                       dtype=input.dtype, device=input.device, memory_format=torch.channels_last)


def _register_cutlass_fakes():
    """Fake kernels of the CUTLASS ops (defined in C++, csrc/cutlass_conv/ops.cpp, where built),
    so fake tensors trace them (torch.compile, torch.export, fused_resnet.aot.rehearsal)."""
    if not _extension.available() or not getattr(_extension.load(), "with_cutlass", 0):
        return
    torch.library.register_fake("fused_resnet::conv2d_bias_act_cutlass")(
        lambda input, weight, stride, padding, bias, residual, relu:
        _cutlass_out(input, weight, stride, padding))
    torch.library.register_fake("fused_resnet::bn_relu_conv2d_cutlass")(
        lambda input, scale, shift, weight, stride, padding:
        _cutlass_out(input, weight, stride, padding))


_register_cutlass_fakes()


def _epilogue_plan(input, weight, stride, padding, dilation, groups, scale, bias, residual,
                   relu):
    candidates = {
        "triton": lambda: _epilogue_triton(input, weight, stride, padding, scale, bias,
                                           residual, relu),
        "library": lambda: _epilogue_library(input, weight, stride, padding, dilation, groups,
                                             scale, bias, residual, relu),
    }
    if scale is None:  # BN folded into the weight: these epilogues add a bias only
        candidates["cutlass"] = lambda: _epilogue_cutlass(input, weight, stride, padding, bias,
                                                          residual, relu)
        if conv_mkldnn.unsupported(input, weight, residual=residual is not None) is None:
            candidates["mkldnn"] = lambda: _epilogue_mkldnn(input, weight, stride, padding,
                                                            dilation, groups, bias, residual,
                                                            relu)
    return candidates, (input, weight, stride, padding, dilation, groups)


@torch.library.custom_op("fused_resnet::conv2d_epilogue", mutates_args=())
def conv2d_epilogue(input: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, scale: Optional[Tensor],
                    bias: Optional[Tensor], residual: Optional[Tensor], relu: bool) -> Tensor:
    return _epilogue_forward(input, weight, stride, padding, dilation, groups, scale, bias,
                             residual, relu)


def _epilogue_forward(input, weight, stride, padding, dilation, groups, scale, bias, residual,
                      relu):
    candidates, conv = _epilogue_plan(input, weight, stride, padding, dilation, groups, scale,
                                      bias, residual, relu)
    epilogue = (("scale", scale is not None), ("bias", bias is not None),
                ("residual", _layout_of(residual)), ("relu", relu))
    return candidates[choose_path("epilogue", candidates, *conv, epilogue=epilogue)]()


def _layout_of(t: Optional[Tensor]):
    """What of an extra operand changes a kernel's speed or result: dtype and memory layout."""
    if t is None:
        return None
    return str(t.dtype).removeprefix("torch."), \
        "channels_last" if layout.is_channels_last(t) else "nchw"


@conv2d_epilogue.register_fake
def _(input, weight, stride, padding, dilation, groups, scale, bias, residual, relu):
    return _empty_conv_out(input, weight, stride, padding, dilation)


# ---- conv2d_dual_epilogue -------------------------------------------------------------------------
def _dual_triton(input, weight, stride, padding, shortcut_input, shortcut_weight,
                 shortcut_stride, bias, relu):
    conv = _conv_kernels()
    out, _ = conv.conv2d_nhwc(
        input, conv.pack_weight(weight), stride[0], padding[0],
        bias=_in_accumulate_dtype(bias, input), relu=relu,
        shortcut=(shortcut_input, conv.pack_weight(shortcut_weight), shortcut_stride),
        allow_tf32=allows_tf32())
    return _output_like(out, input)


def _dual_library(input, weight, stride, padding, shortcut_input, shortcut_weight,
                  shortcut_stride, bias, relu):
    z = _output_like(F.conv2d(input, weight, None, stride, padding), input)
    shortcut = _output_like(F.conv2d(shortcut_input, shortcut_weight, None, shortcut_stride), z)
    scale_f, bias_f = _affine(weight.shape[0], None, bias, z)
    out, _ = _run("bn_add_relu_apply", z, z, shortcut, scale_f, bias_f, relu, False)
    return out


def _dual_cutlass(input, weight, stride, padding, shortcut_input, shortcut_weight,
                  shortcut_stride, bias, relu):
    """Two CUTLASS convs: the projection shortcut (no bias: the summed bias b3 + bd is added
    once, by the second) becomes the residual of conv3's epilogue."""
    shortcut = _epilogue_cutlass(shortcut_input, shortcut_weight, [shortcut_stride] * 2, [0, 0],
                                 None, None, False)
    return _epilogue_cutlass(input, weight, stride, padding, bias, shortcut, relu)


def _dual_mkldnn(input, weight, stride, padding, shortcut_input, shortcut_weight,
                 shortcut_stride, bias, relu):
    """The projection shortcut with the whole bias, then conv3 adding itself (and the ReLU) into
    that shortcut, which nobody else holds: two oneDNN primitives, no extra pass."""
    shortcut = conv_mkldnn.conv2d_act(shortcut_input, shortcut_weight,
                                      _in_accumulate_dtype(bias, input),
                                      [shortcut_stride] * 2, [0, 0], [1, 1], 1, relu=False)
    return conv_mkldnn.conv2d_act(input, weight, None, stride, padding, [1, 1], 1,
                                  residual=shortcut, relu=relu, into_residual=True)


def _dual_plan(input, weight, stride, padding, shortcut_input, shortcut_weight, shortcut_stride,
               bias, relu):
    args = (input, weight, stride, padding, shortcut_input, shortcut_weight, shortcut_stride,
            bias, relu)
    conv = (input, weight, stride, padding, [1, 1], 1)
    # The kernel's second operand is a 1x1 conv of a tensor of the same dtype.
    if shortcut_weight.shape[2:] != (1, 1) or shortcut_input.dtype != input.dtype:
        return {"library": lambda: _dual_library(*args)}, conv
    candidates = {"library": lambda: _dual_library(*args)}
    if conv_mkldnn.unsupported(input, weight, residual=True) is None:
        candidates["mkldnn"] = lambda: _dual_mkldnn(*args)
    if layout.fits_int32_pixel_index(*_pixels(shortcut_input)):  # its second operand too
        candidates["triton"] = lambda: _dual_triton(*args)
    if cutlass_unsupported(shortcut_input, shortcut_weight, [shortcut_stride] * 2, [0, 0],
                           [1, 1], 1) is None:
        candidates["cutlass"] = lambda: _dual_cutlass(*args)
    return candidates, conv


def _check_dual(input, weight, stride, padding, shortcut_input, shortcut_weight,
                shortcut_stride):
    """The shortcut must produce conv3's output grid and channels (a mismatch would make the
    fused GEMM read past the shortcut input): checked before any kernel, naming the problem."""
    n, c_out, oh, ow = _conv_out_shape(input, weight, stride, padding, [1, 1])
    if shortcut_input.dim() != 4 or shortcut_weight.dim() != 4:
        raise ValueError(f"conv2d_dual_epilogue: shortcut input and weight must be 4-D, got "
                         f"{tuple(shortcut_input.shape)} and {tuple(shortcut_weight.shape)}")
    if shortcut_stride < 1:
        raise ValueError(f"conv2d_dual_epilogue: shortcut_stride must be >= 1, got "
                         f"{shortcut_stride}")
    sn, sc, sh, sw = shortcut_input.shape
    k_out, k_in, kh, kw = shortcut_weight.shape
    grid = ((sh - kh) // shortcut_stride + 1, (sw - kw) // shortcut_stride + 1)
    problems = []
    if sn != n:
        problems.append(f"batch {sn} != {n}")
    if k_out != c_out:
        problems.append(f"shortcut weight has {k_out} output channels, conv3 {c_out}")
    if k_in != sc:
        problems.append(f"shortcut weight expects {k_in} input channels, the shortcut input "
                        f"has {sc}")
    if grid != (oh, ow):
        problems.append(f"the shortcut's output is {grid[0]}x{grid[1]}, conv3's {oh}x{ow}")
    if min(oh, ow, *grid) < 1:  # as F.conv2d: a kernel larger than its (padded) input
        problems.append("an input is smaller than its kernel")
    for name, t in (("shortcut_input", shortcut_input), ("shortcut_weight", shortcut_weight)):
        if t.device != input.device:
            problems.append(f"{name} is on {t.device}, input on {input.device}")
    if problems:
        raise ValueError(f"conv2d_dual_epilogue: the projection shortcut does not match conv3 "
                         f"(input {tuple(input.shape)}, weight {tuple(weight.shape)}, shortcut "
                         f"input {tuple(shortcut_input.shape)}, weight "
                         f"{tuple(shortcut_weight.shape)}, stride {shortcut_stride}): "
                         + "; ".join(problems))


@torch.library.custom_op("fused_resnet::conv2d_dual_epilogue", mutates_args=())
def conv2d_dual_epilogue(input: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                         shortcut_input: Tensor, shortcut_weight: Tensor, shortcut_stride: int,
                         bias: Optional[Tensor], relu: bool) -> Tensor:
    return _dual_forward(input, weight, stride, padding, shortcut_input, shortcut_weight,
                         shortcut_stride, bias, relu)


def _dual_forward(input, weight, stride, padding, shortcut_input, shortcut_weight,
                  shortcut_stride, bias, relu):
    _check_dual(input, weight, stride, padding, shortcut_input, shortcut_weight,
                shortcut_stride)
    candidates, conv = _dual_plan(input, weight, stride, padding, shortcut_input,
                                  shortcut_weight, shortcut_stride, bias, relu)
    if len(candidates) == 1:
        return candidates["library"]()
    epilogue = (("shortcut", (tuple(shortcut_input.shape), _layout_of(shortcut_input),
                              tuple(shortcut_weight.shape), shortcut_stride)),
                ("bias", bias is not None), ("relu", relu))
    return candidates[choose_path("dual", candidates, *conv, epilogue=epilogue)]()


def run_conv2d_dual_epilogue(input, weight, stride, padding, shortcut_input, shortcut_weight,
                             shortcut_stride, bias, relu):
    """conv2d_dual_epilogue(...) (inference only): the op, or in plain eager mode its
    implementation without the dispatcher's Python layers (fused_resnet.ops.eager)."""
    return eager.call_inference(conv2d_dual_epilogue, _dual_forward, input, weight, stride,
                                padding, shortcut_input, shortcut_weight, shortcut_stride, bias,
                                relu)


@conv2d_dual_epilogue.register_fake
def _(input, weight, stride, padding, shortcut_input, shortcut_weight, shortcut_stride, bias,
      relu):
    _check_dual(input, weight, stride, padding, shortcut_input, shortcut_weight,
                shortcut_stride)
    return _empty_conv_out(input, weight, stride, padding, [1, 1])


# ---- conv2d_bn_stats ------------------------------------------------------------------------------
def _stats_triton(input, weight, stride, padding):
    conv = _conv_kernels()
    z, (mean, var) = conv.conv2d_nhwc(input, conv.pack_weight(weight), stride[0], padding[0],
                                      stats=True, allow_tf32=allows_tf32())
    return _output_like(z, input), mean, var


def _with_stats(z):
    mean, var, _, _ = _run("bn_stats", z, z, None, None, 0.0)
    return z, mean, var


def _cpu_library_conv(input) -> bool:
    """Whether the library path's conv is conv2d_cpu (csrc/cpu/conv_gemm.cpp: a 1x1 conv over
    few pixels as a GEMM, else oneDNN's), the conv of the C++ CPU training steps."""
    return input.device.type == "cpu" and _extension.available()


def library_conv(input, weight, stride, padding, dilation, groups):
    """The library path's conv, without bias, in input's memory format."""
    if _cpu_library_conv(input):
        return torch.ops.fused_resnet.conv2d_cpu(input, weight, stride, padding, dilation,
                                                 groups)
    return _output_like(F.conv2d(input, weight, None, stride, padding, dilation, groups), input)


def library_conv_backward(grad, input, weight, stride, padding, dilation, groups, need_input,
                          need_weight):
    """(grad_input, grad_weight) of library_conv (None where not asked for). conv2d_cpu's own
    backward is not differentiable: with grad mode on (a double backward) aten's runs."""
    if _cpu_library_conv(input) and not torch.is_grad_enabled():
        grad_input, grad_weight = torch.ops.fused_resnet.conv2d_cpu_backward(
            grad, input, weight, stride, padding, dilation, groups, need_input, need_weight)
    else:
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_input, need_weight, False])
    return grad_input if need_input else None, grad_weight if need_weight else None


def _register_library_conv_fakes():
    if not _extension.available():
        return

    @torch.library.register_fake("fused_resnet::conv2d_cpu")
    def _(input, weight, stride, padding, dilation, groups):
        return _empty_conv_out(input, weight, stride, padding, dilation)

    @torch.library.register_fake("fused_resnet::conv2d_cpu_backward")
    def _(grad, input, weight, stride, padding, dilation, groups, need_input, need_weight):
        return (layout.empty_like_kernel(input) if need_input else input.new_empty(0),
                torch.empty_like(weight) if need_weight else weight.new_empty(0))


_register_library_conv_fakes()


def _stats_library(input, weight, stride, padding, dilation, groups):
    return _with_stats(library_conv(input, weight, stride, padding, dilation, groups))


def _stats_plan(input, weight, stride, padding, dilation, groups):
    candidates = {
        "triton": lambda: _stats_triton(input, weight, stride, padding),
        "library": lambda: _stats_library(input, weight, stride, padding, dilation, groups),
        # the CUTLASS conv (no epilogue) and the statistics kernel
        "cutlass": lambda: _with_stats(_epilogue_cutlass(input, weight, stride, padding, None,
                                                         None, False)),
    }
    return candidates, (input, weight, stride, padding, dilation, groups)


@torch.library.custom_op("fused_resnet::conv2d_bn_stats", mutates_args=())
def conv2d_bn_stats(input: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                    dilation: list[int], groups: int) -> tuple[Tensor, Tensor, Tensor]:
    return conv2d_bn_stats_forward(input, weight, stride, padding, dilation, groups)


def conv2d_bn_stats_forward(input, weight, stride, padding, dilation, groups):
    """conv2d_bn_stats's implementation (for another op's implementation to call directly)."""
    candidates, conv = _stats_plan(input, weight, stride, padding, dilation, groups)
    return candidates[_stats_choice(candidates, conv)]()


def conv2d_bn_stats_path(input, weight, stride, padding, dilation, groups) -> str:
    """The path conv2d_bn_stats would run for these arguments, without running it."""
    return _stats_choice(*_stats_plan(input, weight, stride, padding, dilation, groups))


def _stats_choice(candidates: dict, conv: tuple) -> str:
    return choose_path("bn_stats", candidates, *conv, epilogue=(("stats", True),))


@conv2d_bn_stats.register_fake
def _(input, weight, stride, padding, dilation, groups):
    z = _empty_conv_out(input, weight, stride, padding, dilation)
    return z, layout.empty_per_channel(z), layout.empty_per_channel(z)


def _stats_setup_context(ctx, inputs, output):
    input, weight, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics' gradients


def _stats_backward(ctx, grad_z, _grad_mean, _grad_var):
    if grad_z is None:  # grads are not materialised (setup_context): nothing flows back
        return (None,) * len(ctx.needs_input_grad)
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    need_input, need_weight = ctx.needs_input_grad[:2]
    grad_input, grad_weight = library_conv_backward(grad_z, input, weight, stride, padding,
                                                    dilation, groups, need_input, need_weight)
    return grad_input, grad_weight, None, None, None, None


conv2d_bn_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)
_STATS_EAGER = eager.function("Conv2dBNStats", conv2d_bn_stats_forward, _stats_setup_context,
                              _stats_backward)


def run_conv2d_bn_stats(input, weight, stride, padding, dilation, groups):
    """conv2d_bn_stats(...): the op, or in plain eager mode the same computation without the
    dispatcher's Python layers (fused_resnet.ops.eager)."""
    return eager.call(conv2d_bn_stats, _STATS_EAGER, input, weight, stride, padding, dilation,
                      groups)


# ---- autograd of conv2d_epilogue (fine-tuning with frozen, folded BN) -----------------------------
def _epilogue_setup_context(ctx, inputs, output):
    input, weight, stride, padding, dilation, groups, scale, bias, residual, relu = inputs
    ctx.save_for_backward(input, weight, scale, output if relu else None)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu = relu
    ctx.param_dtypes = (scale.dtype if scale is not None else None,
                        bias.dtype if bias is not None else None)


def _epilogue_backward(ctx, grad_out):
    input, weight, scale, output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    need = ctx.needs_input_grad
    grad_y = grad_out * (output > 0) if ctx.relu else grad_out
    grad_scale = grad_bias = grad_input = grad_weight = None
    if need[7]:
        grad_bias = grad_y.float().sum(dim=(0, 2, 3)).to(ctx.param_dtypes[1])
    if need[6]:  # recompute the raw conv output rather than keep it
        z = F.conv2d(input, weight, None, stride, padding, dilation, groups)
        grad_scale = (grad_y.float() * z.float()).sum(dim=(0, 2, 3)).to(ctx.param_dtypes[0])
    if need[0] or need[1]:
        grad_z = grad_y if scale is None else \
            (grad_y.float() * scale.float().view(1, -1, 1, 1)).to(grad_y.dtype)
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_z, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need[0], need[1], False])
    return (grad_input, grad_weight, None, None, None, None, grad_scale, grad_bias,
            grad_y if need[8] else None, None)


conv2d_epilogue.register_autograd(_epilogue_backward, setup_context=_epilogue_setup_context)
_EPILOGUE_EAGER = eager.function("Conv2dEpilogue", _epilogue_forward, _epilogue_setup_context,
                                 _epilogue_backward)


def run_conv2d_epilogue(input, weight, stride, padding, dilation, groups, scale, bias, residual,
                        relu):
    """conv2d_epilogue(...): the op, or in plain eager mode the same computation without the
    dispatcher's Python layers (fused_resnet.ops.eager)."""
    return eager.call(conv2d_epilogue, _EPILOGUE_EAGER, input, weight, stride, padding, dilation,
                      groups, scale, bias, residual, relu)


# ---- what the ops choose from (static analysis: fused_resnet.aot) --------------------------------
_PLANS = {"conv2d_epilogue": _epilogue_plan, "conv2d_dual_epilogue": _dual_plan,
          "conv2d_bn_stats": _stats_plan}
PLANNED_OPS = tuple(_PLANS)


def dispatch_plan(op: str, *args):
    """For op `op` (a name in this module's ops) called with `args`: the candidates it chooses
    from (path name -> zero-argument callable running that path) and the (input, weight,
    stride, padding, dilation, groups) the choice is made on. Nothing runs until a candidate is
    called."""
    return _PLANS[op](*args)
