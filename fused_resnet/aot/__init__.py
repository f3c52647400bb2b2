"""Static GPU report: what every kernel compiles to on a GPU that is not here.

    python -m fused_resnet.aot --arch sm_90 --out DIR

- Triton: every kernel variant the dispatcher can launch (every op and its epilogue /
  prologue flavours, fp16 / bf16 / fp32 with and without TF32, every tile configuration the
  tuner measures), found by running fused ResNets and lowering their op calls to recorded
  launches (fused_resnet.aot.capture), compiled with triton.compile for the target
  (fused_resnet.aot.triton_build);
- CUDA: every kernel entry of csrc/cuda/*.cu (and csrc/cutlass_conv/*.cu with --cutlass),
  compiled by nvcc (fused_resnet.aot.cuda_build).

For each: the PTX (DIR/ptx/) and a row of DIR/report.json: registers, spill bytes, shared
memory, global loads by width (scalar 16-bit, 16-byte vectors), cp.async / TMA copies, wgmma /
mma.sync, IEEE divisions; DIR/report.md summarises them with the gates
(fused_resnet.aot.gates). The exit status is 1 when a gate fails.
"""

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional

from fused_resnet.aot import cuda_build, gates, ptx, report, triton_build


def parse_arch(arch: str) -> int:
    """"sm_90" / "sm_90a" / "90" -> 90."""
    digits = "".join(ch for ch in arch if ch.isdigit())
    if not digits:
        raise ValueError(f"fused_resnet.aot: cannot read an architecture from {arch!r}")
    return int(digits)


def _row(source: str, module: str, kernel: str, variant: str, dtype: str, compiled: dict,
         used_by: List[str], **extra) -> dict:
    return {"source": source, "module": module, "kernel": kernel, "variant": variant,
            "dtype": dtype, "role": gates.role(source, module, kernel),
            "registers": compiled["registers"], "spill_stores": compiled["spill_stores"],
            "spill_loads": compiled["spill_loads"],
            "stack_frame": compiled.get("stack_frame", 0), "shared": compiled.get("shared", 0),
            **ptx.count_instructions(compiled["ptx"]), "used_by": used_by, **extra}


def _triton_row(spec, launches: list, compile_result, ptx_dir: str) -> dict:
    """The report row of one compiled variant (compile_result: a future of compile_spec)."""
    used = {"used_by": sorted({launch.context for launch in launches}),
            "unguarded_launches": sum(not launch.guarded for launch in launches)}
    variant = report.describe_variant(spec)
    try:
        compiled = compile_result.result()
    except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is a row
        return {"source": "triton", "module": spec.module, "kernel": spec.name,
                "variant": variant, "dtype": spec.dtype,
                "role": gates.role("triton", spec.module, spec.name),
                "error": f"{type(exc).__name__}: {exc}", **used}
    path = os.path.join(ptx_dir, f"triton-{spec.name.strip('_')}-{spec.digest}.ptx")
    with open(path, "w") as f:
        f.write(compiled["ptx"])
    extra = {}
    if "CHANNELS_LAST" in dict(spec.signature):  # the reductions compile the layout in
        extra["layout"] = "nhwc" if spec.constexpr("CHANNELS_LAST") else "nchw"
    return _row("triton", spec.module, spec.name, variant, spec.dtype, compiled,
                used.pop("used_by"), ptx=os.path.relpath(path, os.path.dirname(ptx_dir)),
                num_warps=spec.num_warps, num_stages=spec.num_stages, **used, **extra)


def _compile_triton(specs: dict, capability: int, jobs: int, ptx_dir: str) -> List[dict]:
    """specs: variant -> the recorded launches of it."""
    # spawn: the workers must import Triton fresh (never in interpreter mode, never forked
    # from a process that holds a CUDA context)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {spec: pool.submit(triton_build.compile_spec, spec, capability)
                   for spec in specs}
        return [_triton_row(spec, specs[spec], future, ptx_dir)
                for spec, future in futures.items()]


def triton_rows(capability: int, jobs: int, ptx_dir: str, models=None) -> List[dict]:
    from fused_resnet.aot import capture

    launches = capture.lower(capture.record_op_calls(models))
    specs: dict = {}  # spec -> launches of it
    for launch in launches:
        specs.setdefault(triton_build.kernel_spec(launch), []).append(launch)
    return _compile_triton(specs, capability, jobs, ptx_dir)


def cuda_rows(capability: int, csrc: str, ptx_dir: str,
              cutlass_include: Optional[str] = None) -> List[dict]:
    nvcc = cuda_build.find_nvcc()
    if nvcc is None:
        raise RuntimeError("fused_resnet.aot: no nvcc (set CUDA_HOME) to compile csrc/cuda")
    rows = []
    for source in cuda_build.sources(csrc, cutlass_include):
        name = os.path.splitext(os.path.basename(source))[0]
        for entry in cuda_build.compile_source(source, csrc, capability, nvcc, cutlass_include):
            path = os.path.join(ptx_dir, f"cuda-{name}-{report.digest(entry['entry'])}.ptx")
            with open(path, "w") as f:
                f.write(entry["ptx"])
            kernel = report.short_cuda_name(entry["demangled"])
            rows.append(_row("cuda", os.path.relpath(source, os.path.dirname(csrc)), kernel,
                             entry["demangled"], cuda_build.element_type(entry["demangled"]),
                             entry, [], ptx=os.path.relpath(path, os.path.dirname(ptx_dir))))
    return rows


def build_report(arch: str, out: str, *, jobs: int = 2, triton: bool = True,
                 cuda: bool = True, csrc: Optional[str] = None,
                 cutlass_include: Optional[str] = None, models=None) -> dict:
    """Compile, measure and gate; writes DIR/ptx/, DIR/report.json and DIR/report.md and
    returns {"rows": [...], "failures": {gate: [...]}, ...}."""
    capability = parse_arch(arch)
    ptx_dir = os.path.join(out, "ptx")
    os.makedirs(ptx_dir, exist_ok=True)
    rows: List[dict] = []
    if triton:
        rows += triton_rows(capability, jobs, ptx_dir, models)
    if cuda:
        rows += cuda_rows(capability, csrc or default_csrc(), ptx_dir, cutlass_include)
    result = {"arch": f"sm_{capability}", "rows": rows,
              "failures": gates.failures(rows, capability), **report.environment()}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report.markdown(result))
    return result


def default_csrc() -> str:
    """csrc/ of the source tree this package was installed (editable) or run from."""
    for root in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()):
        for candidate in (os.path.join(root, "csrc"), os.path.join(os.path.dirname(root),
                                                                   "csrc")):
            if os.path.isdir(os.path.join(candidate, "cuda")):
                return candidate
    raise RuntimeError("fused_resnet.aot: csrc/ not found; pass --csrc")
