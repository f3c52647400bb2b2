"""What the compiled code does with memory and the tensor cores, read off PTX text and the
ptxas resource report: per kernel entry, counts of global loads and stores by width, cp.async
copies (and their size), TMA bulk-tensor copies, wgmma and mma.sync instructions and IEEE
divisions; registers, spills and stack from `ptxas -v`.

Counts are static (instructions in the code, not executions): a loop body counts once. That is
what the gates need: whether a narrow load or a missing wgmma exists at all.
"""

import re
from typing import Dict, Iterator, Tuple

_ELEMENT_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}
_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)(.*)$")
_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(")


def entries(ptx: str) -> Iterator[Tuple[str, str]]:
    """(entry name, its text) for every kernel entry of a PTX module; device functions that
    were not inlined are counted with the entry that precedes them."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)]
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        yield name, ptx[start:end]


def _access_bytes(mnemonic: str) -> Tuple[int, int]:
    """(vector lanes, bytes per lane) of an ld/st mnemonic such as ld.global.nc.v4.b32."""
    parts = mnemonic.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    width = re.fullmatch(r"[a-z]+(\d+)(?:x\d+)?", parts[-1])
    return lanes, _ELEMENT_BYTES.get(width.group(1), 0) if width else 0


def _cp_async_bytes(operands: str) -> int:
    """Size operand of `cp.async.c[ag].shared.global [dst], [src], size[, src_size]`."""
    fields = [f.strip() for f in re.sub(r"\[[^\]]*\]", "ADDR", operands).split(",")]
    try:
        return int(fields[2].rstrip(";"), 0)
    except (IndexError, ValueError):
        return 0


def count_instructions(text: str) -> Dict[str, int]:
    counts = dict.fromkeys((
        "ld_global_scalar16", "ld_global_vec16", "ld_global_vec8", "ld_global_other",
        "st_global_scalar16", "st_global_vec16", "st_global_other", "cp_async_16",
        "cp_async_other", "tma_loads", "wgmma", "mma_sync", "div_f32"), 0)
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        mnemonic, operands = match.groups()
        if mnemonic.startswith(("ld.global", "st.global")):
            kind = "ld" if mnemonic.startswith("ld") else "st"
            lanes, lane_bytes = _access_bytes(mnemonic)
            if lanes == 1 and lane_bytes == 2:
                counts[f"{kind}_global_scalar16"] += 1
            elif lanes * lane_bytes == 16:
                counts[f"{kind}_global_vec16"] += 1
            elif kind == "ld" and lanes * lane_bytes == 8:
                counts["ld_global_vec8"] += 1
            else:
                counts[f"{kind}_global_other"] += 1
        elif mnemonic.startswith("cp.async.bulk.tensor"):
            counts["tma_loads"] += 1
        elif re.match(r"cp\.async\.c[ag]\.shared", mnemonic):
            counts["cp_async_16" if _cp_async_bytes(operands) == 16 else "cp_async_other"] += 1
        elif mnemonic.startswith("wgmma.mma_async"):
            counts["wgmma"] += 1
        elif mnemonic.startswith("mma.sync"):
            counts["mma_sync"] += 1
        elif mnemonic.startswith("div.") and mnemonic.endswith(".f32") and ".approx" not in \
                mnemonic:
            counts["div_f32"] += 1
    return counts


def ptxas_resources(report: str) -> Dict[str, Dict[str, int]]:
    """Per function of a `ptxas -v` report: registers, spill stores/loads, stack frame."""
    result: Dict[str, Dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = result.setdefault(entry.group(1), {"registers": 0, "spill_stores": 0,
                                                          "spill_loads": 0, "stack_frame": 0})
            continue
        props = re.search(r"Function properties for (\S+)", line)
        if props:
            current = result.setdefault(props.group(1), {"registers": 0, "spill_stores": 0,
                                                          "spill_loads": 0, "stack_frame": 0})
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads", line)
        if frame:
            current.update(stack_frame=int(frame.group(1)), spill_stores=int(frame.group(2)),
                           spill_loads=int(frame.group(3)))
        registers = re.search(r"Used (\d+) registers", line)
        if registers:
            current["registers"] = int(registers.group(1))
        shared = re.search(r"(\d+) bytes smem", line)
        if shared:
            current["shared"] = int(shared.group(1))
    return result
