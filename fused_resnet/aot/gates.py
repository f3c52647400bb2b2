"""The performance gates, read off the compiled code of every kernel variant (report rows):

- compiles: every variant compiles for the target;
- spills: no kernel spills registers to local memory (spill stores or loads > 0);
- device guard: every Triton launch runs under devices.on_device (Triton launches on the
  current CUDA device, not the tensors'): counted when the launches are recorded;
- shared memory: no kernel asks for more shared memory per block than the target has (227 KB
  on sm_90, 163 KB on sm_80): such a config would fail at launch;
- conv scalar loads: no conv kernel has a scalar 16-bit global load (its activation, weight,
  residual tiles must be 16-byte vectors or cp.async copies: every ResNet layer's channel count
  is a multiple of 8, the stem's is padded to 8);
- conv wgmma: a tensor-core conv for sm_90 issues wgmma (Hopper's warpgroup MMA; mma.sync
  alone runs at a fraction of its rate), and a 16-bit conv uses the tensor cores at all;
- BN reduction vectors: every 16-bit BatchNorm reduction kernel family (kernel x dtype, and
  layout where the layout is compiled in) has a
  16-byte vector-load path (at least one of its variants loads 16 bytes at a time: the aligned
  path; misaligned or odd-sized inputs may take a scalar fallback).

Roles come from the kernels' names and files: Triton kernels of kernels/conv.py and CUDA
kernels named *conv* are convs; *_partial kernels of the BN reductions are reductions.
"""

import re
from collections import defaultdict
from typing import Dict, List

SIXTEEN_BIT = ("fp16", "bf16")
SHARED_LIMIT = {90: 227 * 1024, 89: 99 * 1024, 86: 99 * 1024, 80: 163 * 1024}


def shared_limit(capability: int) -> int:
    return SHARED_LIMIT.get(capability, min(SHARED_LIMIT.values()))


def role(source: str, module: str, kernel: str) -> str:
    if source == "triton" and module.endswith(".conv") or re.search(r"conv", kernel,
                                                                     re.IGNORECASE):
        return "conv"
    if re.search(r"(stats|reduce)_partial", kernel):
        return "bn_reduce"
    return "other"


def _label(row: dict) -> str:
    variant = row["variant"] if len(row["variant"]) <= 160 else row["variant"][:157] + "..."
    return f"{row['source']} {row['kernel']} [{variant}] {row['dtype'] or '?'}"


def failures(rows: List[dict], capability: int) -> Dict[str, List[str]]:
    """Gate name -> the variants that fail it (empty lists: passed)."""
    failed: Dict[str, List[str]] = {"compiles": [], "device guard": [], "spills": [],
                                    "shared memory": [],
                                    "conv scalar 16-bit loads": [],
                                    "16-bit conv without wgmma": [],
                                    "16-bit BN reduction without 16-byte loads": []}
    reductions = defaultdict(list)
    for row in rows:
        if row.get("unguarded_launches"):
            failed["device guard"].append(f"{_label(row)}: {row['unguarded_launches']} launches "
                                          f"not under devices.on_device: {row['used_by'][:3]}")
        if row.get("error"):
            failed["compiles"].append(f"{_label(row)}: {row['error'][:300]}")
            continue
        if row["spill_stores"] or row["spill_loads"]:
            failed["spills"].append(f"{_label(row)}: {row['spill_stores']} B stores, "
                                    f"{row['spill_loads']} B loads")
        if (row.get("shared") or 0) > shared_limit(capability):
            failed["shared memory"].append(f"{_label(row)}: {row['shared']} B > "
                                           f"{shared_limit(capability)} B")
        uses_tensor_cores = row["wgmma"] or row["mma_sync"]
        if row["role"] == "conv" and capability >= 90 and uses_tensor_cores and \
                not row["wgmma"]:  # whatever its element type (one not read is "?")
            failed["16-bit conv without wgmma"].append(
                f"{_label(row)}: {row['mma_sync']} mma.sync, no wgmma")
        if row["role"] == "conv" and row["dtype"] in SIXTEEN_BIT:
            if row["ld_global_scalar16"]:
                failed["conv scalar 16-bit loads"].append(
                    f"{_label(row)}: {row['ld_global_scalar16']} scalar 16-bit loads")
            if not uses_tensor_cores:
                failed["16-bit conv without wgmma"].append(
                    f"{_label(row)}: no tensor-core instruction at all")
        if row["role"] == "bn_reduce" and row["dtype"] in SIXTEEN_BIT:
            reductions[(row["source"], row["kernel"], row["dtype"],
                        row.get("layout", ""))].append(row)
    for (source, kernel, dtype, layout), family in sorted(reductions.items()):
        if not any(r["ld_global_vec16"] for r in family):
            failed["16-bit BN reduction without 16-byte loads"].append(
                f"{source} {kernel} {dtype} {layout}: none of its {len(family)} variants "
                f"loads 16 bytes")
    return failed
