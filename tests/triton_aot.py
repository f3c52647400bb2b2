"""Ahead-of-time compilation of Triton kernels for the H100 (sm_90) on a machine with no GPU.

    python tests/triton_aot.py      prints one JSON line per compiled kernel variant

Runs in its own process: under TRITON_INTERPRET=1 (set by the test suite) @triton.jit gives
interpreter functions that cannot be compiled. Registers and spills come from the ptxas that
ships inside triton; shared memory from the compiled kernel's metadata.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

H100_MAX_SHARED_BYTES = 227 * 1024


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ast_source(fn, signature, constexprs, divisible_by_16):
    from triton.compiler import ASTSource

    # What Triton's JIT infers at launch for 16-byte-aligned pointers and sizes divisible by
    # 16 (the common case): without it the compiler cannot vectorise loads.
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    try:  # triton >= 3.4 keys constexprs by name
        return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    except Exception:  # older releases key them by (argument index,)
        by_index = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        return ASTSource(fn, signature, constexprs=by_index, attrs=attrs)


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4,
                 divisible_by_16=()) -> dict:
    """divisible_by_16: argument names (pointers, sizes) to compile as multiples of 16."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = _ast_source(fn, signature, constexprs, divisible_by_16)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
        ptx_path = f.name
    try:
        out = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(ptx_path)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    registers = re.search(r"Used (\d+) registers", out)
    return {
        "shared": kernel.metadata.shared,
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "registers": int(registers.group(1)),
    }


def bn_act_variants():
    """Every bn_act kernel with the launch configuration its launcher uses on a GPU."""
    import torch

    from fused_resnet.kernels import bn_act

    nchw = torch.empty(64, 256, 56, 56, device="meta")
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    block = bn_act._elementwise_block(nchw)
    sizes = {"C": "i32", "inner": "i32"}
    for t in ("fp16", "bf16"):
        yield ("apply", t, bn_act._apply_kernel,
               {"x_ptr": f"*{t}", "res_ptr": f"*{t}", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                "out_ptr": f"*{t}", "mask_ptr": "*u8", "numel": "i64", **sizes,
                "HAS_RESIDUAL": "constexpr", "RELU": "constexpr", "SAVE_MASK": "constexpr",
                "BLOCK": "constexpr"},
               {"HAS_RESIDUAL": True, "RELU": True, "SAVE_MASK": True, "BLOCK": block})
        yield ("grad_apply", t, bn_act._grad_apply_kernel,
               {"grad_ptr": f"*{t}", "mask_ptr": "*u8", "x_ptr": f"*{t}", "mean_ptr": "*fp32",
                "k_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "dx_ptr": f"*{t}",
                "dres_ptr": f"*{t}", "numel": "i64", **sizes, "RELU": "constexpr",
                "RESIDUAL_GRAD": "constexpr", "BLOCK": "constexpr"},
               {"RELU": True, "RESIDUAL_GRAD": True, "BLOCK": block})
        for name, x in (("nchw", nchw), ("nhwc", nhwc)):
            block_m, block_c = bn_act._reduce_tiles(x)
            tiles = {"BLOCK_M": block_m, "BLOCK_C": block_c,
                     "CHANNELS_LAST": name == "nhwc"}
            rows = {"per_channel": "i32", "rows_per_split": "i32", "BLOCK_M": "constexpr",
                    "BLOCK_C": "constexpr", "CHANNELS_LAST": "constexpr"}
            yield (f"stats_partial_{name}", t, bn_act._stats_partial_kernel,
                   {"x_ptr": f"*{t}", "mean_ptr": "*fp32", "m2_ptr": "*fp32", **sizes, **rows},
                   tiles)
            yield (f"grad_reduce_partial_{name}", t, bn_act._grad_reduce_partial_kernel,
                   {"grad_ptr": f"*{t}", "mask_ptr": "*u8", "x_ptr": f"*{t}",
                    "mean_ptr": "*fp32", "sum_dz_ptr": "*fp32", "sum_dzxmu_ptr": "*fp32",
                    **sizes, "per_channel": "i32", "rows_per_split": "i32",
                    "RELU": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
                    "CHANNELS_LAST": "constexpr"},
                   {"RELU": True, **tiles})
    yield ("stats_final", "fp32", bn_act._stats_final_kernel,
           {"mean_part_ptr": "*fp32", "m2_part_ptr": "*fp32", "mean_ptr": "*fp32",
            "var_ptr": "*fp32", "C": "i32", "per_channel": "i32", "rows_per_split": "i32",
            "splits": "i32", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"},
           {"BLOCK_P": 32, "BLOCK_C": 64})


def conv_variants():
    """The implicit-GEMM conv for the ResNet conv kinds (1x1, 3x3, the 7x7 C_in=3 stem, the
    fused projection shortcut, the statistics epilogue), with its GPU launch configuration."""
    from fused_resnet.kernels import conv

    fn = conv._conv_kernel
    sizes = ("N", "H", "W", "C_in", "OH", "OW", "C_out", "H2", "W2", "C2", "stride", "pad",
             "stride2")
    kinds = {  # name: (KH, KW, C_in divisible by 16, shortcut, stats, prologue)
        "conv1x1_bn_relu": (1, 1, True, False, False, False),
        "conv3x3_bn_add_relu": (3, 3, True, False, False, False),
        "conv3x3_stats": (3, 3, True, False, True, False),
        "stem7x7_cin3": (7, 7, False, False, False, False),
        "conv1x1_plus_shortcut": (1, 1, True, True, False, False),
        "bn_relu_conv3x3_stats": (3, 3, True, False, True, True),  # ConvBNfprop
        "bn_relu_conv1x1_stats": (1, 1, True, False, True, True),
    }
    for t, config in [(t, c) for t in ("fp16", "bf16") for c in conv.GPU_CONFIGS]:
        block_m, block_n, block_k, num_warps = config
        pointers = {name: f"*{t}" for name in ("x_ptr", "w_ptr", "x2_ptr", "w2_ptr", "out_ptr",
                                               "res_ptr")}
        pointers.update({name: "*fp32" for name in ("scale_ptr", "bias_ptr", "tile_mean_ptr",
                                                    "tile_m2_ptr", "pscale_ptr", "pshift_ptr")})
        signature = {a: pointers.get(a, "i32" if a in sizes else "constexpr")
                     for a in fn.arg_names}
        for name, (kh, kw, aligned, shortcut, stats, prologue) in kinds.items():
            if config not in conv.gpu_configs(64 if aligned else 3, prologue):
                continue  # the launcher never uses this config for this kind
            divisible = [a for a in fn.arg_names if a.endswith("_ptr")] + ["C_out", "C2"]
            if aligned:
                divisible.append("C_in")
            constexprs = dict(KH=kh, KW=kw, HAS_SHORTCUT=shortcut, HAS_SCALE=not stats,
                              HAS_BIAS=not stats, HAS_RESIDUAL=kh == 3 and not stats,
                              RELU=not stats, STATS=stats, DOT_PRECISION="tf32",
                              TAP_PER_CHUNK=aligned, PROLOGUE=prologue, BLOCK_M=block_m,
                              BLOCK_N=block_n,
                              BLOCK_K=block_k)
            yield (f"{name}@{block_m}x{block_n}x{block_k}w{num_warps}", t, fn, signature,
                   constexprs, num_warps, divisible)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for the GPU", file=sys.stderr)
        return 2
    variants = [v + (4, ()) for v in bn_act_variants()] + list(conv_variants())
    for name, dtype, fn, signature, constexprs, num_warps, divisible in variants:
        try:
            result = compile_sm90(fn, signature, constexprs, num_warps, divisible)
            result.update(kernel=name, dtype=dtype, ok=True)
        except Exception as exc:  # report every variant, not only the first failure
            result = {"kernel": name, "dtype": dtype, "ok": False, "error": repr(exc)[:2000]}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
