"""The static report's words: short names of kernel variants, the environment it was compiled
in, and the markdown summary (per kernel family: variants, worst registers, spills, load
widths, copies, tensor-core instructions; then the gates)."""

import datetime
import hashlib
import platform
import re
import subprocess
from collections import defaultdict
from typing import Dict, List

# Constexprs shown by value; the boolean flavour switches are shown by name when on.
_SHAPE_CONSTEXPRS = ("KH", "KW", "SMALL_C_IN", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK",
                     "BLOCK_C", "BLOCK_P", "DOT_PRECISION")


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def describe_variant(spec) -> str:
    """e.g. "KH=3 KW=3 BLOCK_M=128 ... | HAS_BIAS RELU | C_in%16 C_out%16 | w8 s3"."""
    names = [p for p, _ in spec.signature]
    values = {names[i]: v for i, v in spec.constexprs}
    shape = [f"{k}={values[k]}" for k in _SHAPE_CONSTEXPRS if k in values and
             values[k] not in (0, None)]
    flags = [k for k, v in values.items() if v is True]
    ones = [k for k, v in values.items() if k not in _SHAPE_CONSTEXPRS and v is not True and
            v is not False and v == 1]
    divisible = [f"{names[i]}%16" for i in spec.divisible if not names[i].endswith("_ptr")]
    parts = [" ".join(shape), " ".join(flags) or "-", " ".join(divisible) or "-"]
    if ones:
        parts.append(" ".join(f"{k}=1" for k in ones))
    parts.append(f"w{spec.num_warps} s{spec.num_stages}")
    return " | ".join(parts)


def _top_level_template_args(text: str) -> List[str]:
    args, depth, current = [], 0, ""
    for ch in text:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += ch
    return args + ([current.strip()] if current.strip() else [])


def short_cuda_name(demangled: str) -> str:
    """A CUDA kernel's family name out of its demangled symbol: the function's own name, plus
    its first template argument when that is a functor rather than the element type
    ("reduce_partial_kernel<StatsAccumulate>", "apply_kernel")."""
    text = demangled.replace("(anonymous namespace)::", "")
    head = text.split("(", 1)[0].removeprefix("void ")  # the parameters start at the "("
    name, _, templ = head.partition("<")
    name = name.split("::")[-1]
    if not templ:
        return name
    first = _top_level_template_args(templ[:templ.rindex(">")])[0]
    first = re.sub(r"<.*", "", first).split("::")[-1]
    if first in ("float", "__half", "__nv_bfloat16", "half_t", "bfloat16_t"):
        return name
    return f"{name}<{first}>"


def _version(cmd: List[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "not found"
    match = re.search(r"release [\d.]+|V[\d.]+", out)
    return match.group(0) if match else out.strip().splitlines()[-1] if out.strip() else "?"


def environment() -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from fused_resnet.aot import cuda_build

    nvcc = cuda_build.find_nvcc()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "triton": triton_version,
            "nvcc": _version([nvcc, "--version"]) if nvcc else "not found",
            "host": f"{platform.machine()}, no GPU needed"}


_COLUMNS = (("variants", None), ("registers (max)", "registers"),
            ("spill B", "spill"), ("shared KB (max)", "shared"),
            ("scalar 16-bit ld", "ld_global_scalar16"), ("16-B ld", "ld_global_vec16"),
            ("cp.async 16 B", "cp_async_16"), ("TMA", "tma_loads"), ("wgmma", "wgmma"),
            ("mma.sync", "mma_sync"), ("div.f32", "div_f32"))


def _family_key(row: dict):
    return (row["source"], row["kernel"], row["dtype"], row.get("layout", ""))


def _summarise(family: List[dict]) -> List[str]:
    ok = [r for r in family if not r.get("error")]
    cells = [str(len(family))]
    for _, field in _COLUMNS[1:]:
        if field == "registers":
            cells.append(str(max((r["registers"] for r in ok), default=0)))
        elif field == "spill":
            cells.append(str(sum(r["spill_stores"] + r["spill_loads"] for r in ok)))
        elif field == "shared":
            cells.append(f"{max((r['shared'] or 0 for r in ok), default=0) / 1024:.0f}")
        else:  # instruction counts: the range over the family's variants
            values = [r[field] for r in ok]
            low, high = min(values, default=0), max(values, default=0)
            cells.append(str(low) if low == high else f"{low}-{high}")
    return cells


def markdown(result: dict) -> str:
    rows = result["rows"]
    failures: Dict[str, List[str]] = result["failures"]
    lines = [f"# Static GPU report ({result['arch']})", "",
             f"Compiled {result['date']} on {result['host']}: torch {result['torch']}, "
             f"triton {result['triton']}, nvcc {result['nvcc']}. Command: `python -m "
             f"fused_resnet.aot --arch {result['arch']} --out DIR`. Counts are static "
             f"(instructions in the code, a loop body once), ranges over a family's variants; "
             f"not yet measured on GPU.", "", "## Gates", ""]
    for gate, failed in failures.items():
        lines.append(f"- {'PASS' if not failed else 'FAIL'}: {gate}"
                     + ("" if not failed else f" ({len(failed)})"))
        lines += [f"  - {f}" for f in failed[:20]]
        if len(failed) > 20:
            lines.append(f"  - ... {len(failed) - 20} more in report.json")
    families = defaultdict(list)
    for row in rows:
        families[_family_key(row)].append(row)
    lines += ["", "## Kernels", "",
              "| source | kernel | dtype | layout | " + " | ".join(c for c, _ in _COLUMNS) + " |",
              "|" + "---|" * (4 + len(_COLUMNS))]
    for key in sorted(families):
        source, kernel, dtype, layout = key
        lines.append(f"| {source} | {kernel} | {dtype or '-'} | {layout or '-'} | "
                     + " | ".join(_summarise(families[key])) + " |")
    lines += ["", f"{len(rows)} variants in all; per-variant rows (with the op calls that "
              f"launch each Triton variant) in report.json, PTX in ptx/.", ""]
    return "\n".join(lines)
