"""python -m fused_resnet.aot --arch sm_90 --out DIR: see fused_resnet.aot."""

import argparse
import os
import sys

# Compiling for a GPU needs Triton's compiler, not its CPU interpreter: decided when triton
# is first imported, so before anything imports it.
os.environ.pop("TRITON_INTERPRET", None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.aot",
                                     description=__doc__.split(":")[0])
    parser.add_argument("--arch", default="sm_90", help="target, e.g. sm_90 (default), sm_80")
    parser.add_argument("--out", required=True, help="directory for report.json/.md and ptx/")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel Triton compilations (default: all cores)")
    parser.add_argument("--csrc", help="csrc/ of the source tree (default: found)")
    parser.add_argument("--cutlass", metavar="INCLUDE", nargs="?", const="auto",
                        help="also compile csrc/cutlass_conv with CUTLASS's headers "
                             "(INCLUDE, or the pinned nvidia-cutlass wheel's)")
    parser.add_argument("--no-triton", action="store_true", help="CUDA kernels only")
    parser.add_argument("--no-cuda", action="store_true", help="Triton kernels only")
    args = parser.parse_args(argv)

    from fused_resnet import aot

    cutlass = _cutlass_include(args.cutlass) if args.cutlass else None
    result = aot.build_report(args.arch, args.out, jobs=args.jobs, triton=not args.no_triton,
                              cuda=not args.no_cuda, csrc=args.csrc, cutlass_include=cutlass)
    failed = {gate: f for gate, f in result["failures"].items() if f}
    print(f"{len(result['rows'])} kernel variants compiled for {result['arch']}; report in "
          f"{os.path.join(args.out, 'report.md')}")
    for gate, items in result["failures"].items():
        print(f"  {'FAIL' if items else 'pass'}: {gate}" + (f" ({len(items)})" if items else ""))
        for item in items[:10]:
            print(f"      {item}")
    return 1 if failed else 0


def _cutlass_include(given: str) -> str:
    if given != "auto":
        return given
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = os.path.join(location, "source", "include")
        if os.path.exists(os.path.join(include, "cutlass", "cutlass.h")):
            return include
    raise SystemExit("--cutlass: CUTLASS headers not found (pip install --no-deps "
                     "nvidia-cutlass==4.2.0.0, or --cutlass INCLUDE)")


if __name__ == "__main__":
    sys.exit(main())
