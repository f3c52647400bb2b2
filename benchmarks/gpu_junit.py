"""Did the GPU tests run? Reads the junit XML of a `pytest -m gpu` run (every test in it is
GPU-marked) and fails when none ran, or when any was skipped for want of a usable GPU (no CUDA
device, a backend that cannot run on CUDA, TRITON_INTERPRET set, _C without CUDA or CUTLASS):
on the GPU machine such a skip means the run tested nothing, whatever pytest's exit status.
Skips for other reasons (two GPUs needed, a slow profile) are allowed.

    python benchmarks/gpu_junit.py test-junit.xml      # one line; exit 0 ok, 1 not

benchmarks/gpu_session.sh runs it after each GPU test phase.
"""

import re
import sys
import xml.etree.ElementTree as ET

# skip reasons that mean "this machine's GPU was not usable" (the tests' own wording:
# conftest.requires_cuda, backend_params, the _C / CUTLASS skips)
NO_GPU = re.compile(r"no CUDA|CUDA (device )?(is )?not available|backend on cuda|"
                    r"TRITON_INTERPRET|without (the )?(CUDA|CUTLASS)|_C is not built|"
                    r"no extension|extension not built|\bno GPU\b|needs a (CUDA|GPU)",
                    re.IGNORECASE)


def read(path: str):
    """(tests that ran, [(test, reason) skipped for want of a GPU], other skips)."""
    root = ET.parse(path).getroot()
    ran, no_gpu, other = 0, [], 0
    for case in root.iter("testcase"):
        skipped = case.find("skipped")
        if skipped is None:
            ran += 1
            continue
        reason = skipped.get("message") or skipped.text or ""
        if NO_GPU.search(reason):
            no_gpu.append((f"{case.get('classname', '')}::{case.get('name', '')}", reason))
        else:
            other += 1
    return ran, no_gpu, other


def verdict(path: str):
    """(ok, one line)."""
    try:
        ran, no_gpu, other = read(path)
    except (OSError, ET.ParseError) as exc:
        return False, f"no readable junit XML ({exc})"
    if no_gpu:
        test, reason = no_gpu[0]
        return False, (f"{len(no_gpu)} GPU tests skipped for want of a GPU (first: {test}: "
                       f"{reason}); {ran} ran")
    if ran == 0:
        return False, f"not one GPU test ran ({other} skipped)"
    return True, f"{ran} GPU tests ran, {other} skipped for other reasons"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    ok, line = verdict(args[0])
    print(f"gpu_junit: {line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
