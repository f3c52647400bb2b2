"""The static GPU report (python -m fused_resnet.aot) and its gates, run here with no GPU: every
Triton kernel variant the dispatcher can launch and every CUDA kernel compiles for sm_90 without
spills, within the shared-memory limit; convs load 16-byte vectors and use wgmma; the 16-bit BN
reductions have a 16-byte vector path. Plus unit tests of the pieces the gates rely on (PTX
counting, argument specialisation, the gates themselves on rows made to fail)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fused_resnet.aot import gates, ptx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90 = 90

pytest.importorskip("triton")


def _nvcc_available() -> bool:
    from fused_resnet.aot import cuda_build

    return cuda_build.find_nvcc() is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One run of the whole report (a few minutes on two cores: every variant is compiled)."""
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fused_resnet.aot", "--arch", "sm_90", "--out", str(out),
           "--csrc", os.path.join(ROOT, "csrc")]
    if not _nvcc_available():
        cmd.append("--no-cuda")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=out)
    with open(out / "report.json") as f:
        result = json.load(f)
    return {"run": run, "result": result, "out": out}


def test_every_gate_passes(report):
    failed = {gate: items for gate, items in report["result"]["failures"].items() if items}
    assert not failed, json.dumps(failed, indent=1)[:6000]
    assert report["run"].returncode == 0, report["run"].stdout + report["run"].stderr


def test_report_files(report):
    out = report["out"]
    markdown = (out / "report.md").read_text()
    assert "## Gates" in markdown and "## Kernels" in markdown
    for row in report["result"]["rows"]:
        assert (out / row["ptx"]).exists(), row


def _triton_kernels(module):
    from triton.runtime.jit import JITFunction

    return {name for name, value in vars(module).items() if isinstance(value, JITFunction)}


def test_every_triton_kernel_is_compiled(report):
    """Every @triton.jit kernel of the package is reached by some fused model's op calls (a
    kernel the capture misses would escape the gates)."""
    from fused_resnet.kernels import bn_act, conv

    compiled = {(r["kernel"], r["dtype"]) for r in report["result"]["rows"]
                if r["source"] == "triton"}
    helpers = {"_grouped_tile", "_relu_bits", "_column_moments", "_tile_moments", "_chan_merge",
               "_nhwc_tile", "_nchw_tile", "_split_images", "_dz_tile"}
    for module in (conv, bn_act):
        for kernel in _triton_kernels(module) - helpers:
            dtypes = ("fp32",) if kernel == "_stats_final_kernel" else ("fp16", "bf16", "fp32")
            for dtype in dtypes:
                assert (kernel, dtype) in compiled, (kernel, dtype)


def test_conv_variants_cover_flavours_and_configs(report):
    """The conv is compiled in each flavour the ops use, in every dtype (fp32 with and without
    TF32), at every tile config the tuner can measure for a 64-channel input."""
    from fused_resnet.kernels import conv

    rows = [r for r in report["result"]["rows"] if r["kernel"] == "_conv_kernel"]
    variants = [r["variant"] for r in rows]
    for flag in ("PROLOGUE", "STATS", "HAS_SHORTCUT", "HAS_RESIDUAL", "SMALL_C_IN=8"):
        assert any(flag in v for v in variants), flag
    assert any("DOT_PRECISION=ieee" in v for v in variants)
    assert any("DOT_PRECISION=tf32" in r["variant"] and r["dtype"] == "fp32" for r in rows)
    for dtype in (torch.float16, torch.float32):
        for bm, bn, bk, warps, stages in conv.gpu_configs(64, 256, dtype):
            tile = f"BLOCK_M={bm} BLOCK_N={bn} BLOCK_K={bk}"
            assert any(tile in v and f"w{warps} s{stages}" in v for v in variants), tile


@pytest.mark.skipif(not _nvcc_available(), reason="no nvcc: CUDA kernels not compiled")
def test_cuda_kernels_are_compiled(report):
    cuda = {(r["kernel"], r["dtype"]) for r in report["result"]["rows"] if r["source"] == "cuda"}
    for kernel in ("reduce_partial_kernel<StatsAccumulate>",
                   "reduce_partial_kernel<GradAccumulate>", "apply_kernel", "grad_apply_kernel"):
        for dtype in ("fp16", "bf16", "fp32"):
            assert (kernel, dtype) in cuda, (kernel, dtype)


def test_stats_merge_compiles_for_a_single_element_per_channel(tmp_path):
    """An int argument equal to 1 is compiled in as a constant unless the kernel says not to:
    the merge kernel with per_channel == 1 (N=1, 1x1 output) must still compile (it did not:
    per_channel.to(...) on a constant)."""
    script = (
        "import torch\n"
        "from fused_resnet.aot import capture, triton_build\n"
        "from fused_resnet.kernels import bn_act\n"
        "part = torch.empty(1, 8, device='meta')\n"
        "with capture.recorded_launches() as launches:\n"
        "    bn_act.merge_partial_stats(part, part, 1, 1)\n"
        "spec = triton_build.kernel_spec(launches[0])\n"
        "assert triton_build.compile_spec(spec, 90)['spill_stores'] == 0\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # not from the repository root: `python -c` would import its unbuilt source tree
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    assert run.stdout.strip().endswith("ok"), run.stderr[-3000:]


# ---- the pieces ---------------------------------------------------------------------------------
PTX_SAMPLE = """
.visible .entry k(
)
{
	@%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
	ld.global.nc.v4.u32 {%r1, %r2, %r3, %r4}, [%rd2];
	ld.global.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
	cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
	cp.async.ca.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 4;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd6, %rd7, p, 1, 1, 0, 1;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f2}, {%r1}, {%r2}, {%f3};
	div.rn.f32 %f4, %f5, %f6;
	div.approx.f32 %f7, %f8, %f9;
	st.global.v4.b32 [ %rd8 + 0 ], { %r1, %r2, %r3, %r4 };
	@!%p2 st.global.b16 [ %rd9 + 0 ], { %rs2 };
	cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
}
"""


def test_ptx_counts():
    (name, text), = ptx.entries(PTX_SAMPLE)
    counts = ptx.count_instructions(text)
    assert name == "k"
    assert counts == {"ld_global_scalar16": 1, "ld_global_vec16": 1, "ld_global_vec8": 1,
                      "ld_global_other": 0, "st_global_scalar16": 1, "st_global_vec16": 1,
                      "st_global_other": 0, "cp_async_16": 1, "cp_async_other": 1,
                      "tma_loads": 1, "wgmma": 1, "mma_sync": 1, "div_f32": 1}


def test_ptxas_report_parsing():
    text = ("ptxas info    : Compiling entry function 'k1' for 'sm_90a'\n"
            "ptxas info    : Function properties for k1\n"
            "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem\n"
            "ptxas info    : Compiling entry function 'k2' for 'sm_90a'\n"
            "ptxas info    : Function properties for k2\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
            "ptxas info    : Used 40 registers\n")
    got = ptx.ptxas_resources(text)
    assert got["k1"] == {"registers": 255, "spill_stores": 12, "spill_loads": 4,
                         "stack_frame": 8, "shared": 2048}
    assert got["k2"]["registers"] == 40 and got["k2"]["spill_stores"] == 0


def _row(**overrides):
    row = {"source": "triton", "kernel": "_conv_kernel", "variant": "v", "dtype": "bf16",
           "role": "conv", "spill_stores": 0, "spill_loads": 0, "shared": 1024,
           "ld_global_scalar16": 0, "ld_global_vec16": 4, "wgmma": 4, "mma_sync": 0}
    row.update(overrides)
    return row


@pytest.mark.parametrize("bad, gate", [
    (dict(spill_stores=8), "spills"),
    (dict(shared=300 * 1024), "shared memory"),
    (dict(error="CompilationError: x"), "compiles"),
    (dict(unguarded_launches=3, used_by=["conv2d_epilogue (resnet18 eval ...)"]),
     "device guard"),
    (dict(ld_global_scalar16=32), "conv scalar 16-bit loads"),
    (dict(wgmma=0, mma_sync=8), "16-bit conv without wgmma"),
    (dict(wgmma=0), "16-bit conv without wgmma"),
    (dict(kernel="_stats_partial_kernel", role="bn_reduce", ld_global_vec16=0),
     "16-bit BN reduction without 16-byte loads"),
])
def test_each_gate_can_fail(bad, gate):
    assert not any(gates.failures([_row()], SM90).values())
    failed = gates.failures([_row(**bad)], SM90)
    assert failed[gate] and not any(v for k, v in failed.items() if k != gate), failed


def test_reduction_gate_takes_the_family():
    """A reduction family passes when one variant (its aligned path) loads 16 bytes; a fp32
    reduction or a conv in fp32 is not held to the 16-bit gates."""
    family = [_row(kernel="r", role="bn_reduce", ld_global_vec16=0),
              _row(kernel="r", role="bn_reduce", ld_global_vec16=2)]
    assert not any(gates.failures(family, SM90).values())
    fp32 = [_row(kernel="r", role="bn_reduce", dtype="fp32", ld_global_vec16=0),
            _row(dtype="fp32", wgmma=0, ld_global_scalar16=3)]
    assert not any(gates.failures(fp32, SM90).values())


def test_tensor_core_conv_without_wgmma_fails_whatever_its_dtype():
    """A conv whose element type could not be read (e.g. a symbol no tool demangles) is still
    held to the wgmma gate on sm_90; on sm_80 mma.sync is the right instruction."""
    row = _row(source="cuda", kernel="Kernel<ImplicitGemmConvolution>", dtype="", wgmma=0,
               mma_sync=64)
    assert gates.failures([row], SM90)["16-bit conv without wgmma"]
    assert not any(gates.failures([row], 80).values())


def test_cuda_symbol_names():
    """Family names and element types of CUDA kernels, from symbols c++filt can and cannot
    demangle (CUTLASS's are too long for binutils' c++filt)."""
    from fused_resnet.aot import cuda_build
    from fused_resnet.aot.report import short_cuda_name

    spelled = cuda_build._spelled("_ZN7cutlass6KernelINS_4conv6kernel40ImplicitGemmConvolution"
                                  "WithFusedEpilogueINS_10bfloat16_tEEEEvNT_6ParamsE")
    assert short_cuda_name(spelled) == "Kernel<ImplicitGemmConvolutionWithFusedEpilogue>"
    assert cuda_build.element_type(spelled) == "bf16"
    assert cuda_build.element_type("void k<cutlass::half_t, float>(float*)") == "fp16"
    assert cuda_build.element_type("void k<float>(float*)") == "fp32"
    assert cuda_build.element_type("void k<int>(int*)") == ""
    demangled = cuda_build.demangle(["_ZN12fused_resnet4cuda12apply_kernelI6__halfLb1EEEvPKT_"])
    assert short_cuda_name(demangled[0]) == "apply_kernel"
    assert cuda_build.element_type(demangled[0]) == "fp16"


def test_roles():
    assert gates.role("triton", "fused_resnet.kernels.conv", "_conv_kernel") == "conv"
    assert gates.role("triton", "fused_resnet.kernels.bn_act", "_stats_partial_kernel") == \
        "bn_reduce"
    assert gates.role("cuda", "csrc/cuda/bn_add_relu.cu",
                      "reduce_partial_kernel<StatsAccumulate>") == "bn_reduce"
    assert gates.role("cuda", "csrc/cutlass_conv/conv_fprop.cu",
                      "Kernel<ImplicitGemmConvolution>") == "conv"
    assert gates.role("triton", "fused_resnet.kernels.bn_act", "_apply_kernel") == "other"


def test_specialisation_matches_triton():
    """The fallback spelling of Triton's argument specialisation agrees with Triton's own."""
    from fused_resnet.aot import triton_build

    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no native specialisation to compare with")

    class Param:
        is_const = False
        do_not_specialize = False
        do_not_specialize_on_alignment = False

    base = torch.empty(64, dtype=torch.float16)
    for value in (1, 2, 16, 48, 17, 2**33, base, base[1:], base[8:]):
        assert triton_build._specialize(value, Param()) == \
            triton_build._specialize_like_triton(value, Param()), value
    Param.do_not_specialize = True
    for value in (1, 16, 17):
        assert triton_build._specialize(value, Param())[1] == \
            triton_build._specialize_like_triton(value, Param())[1], value
