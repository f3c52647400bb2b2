"""python -m fused_resnet.aot --arch sm_90 --out DIR: see fused_resnet.aot.
python -m fused_resnet.aot --rehearse [--batch N] [--out DIR]: see fused_resnet.aot.rehearsal."""

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
    parser.add_argument("--out", help="directory for report.json/.md and ptx/ (with "
                                      "--rehearse: rehearsal.json/.md)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel Triton compilations (default: all cores)")
    parser.add_argument("--csrc", help="csrc/ of the source tree (default: found)")
    parser.add_argument("--cutlass", metavar="INCLUDE", nargs="?", const="auto",
                        help="also compile csrc/cutlass_conv with CUTLASS's headers "
                             "(INCLUDE, or the pinned nvidia-cutlass wheel's)")
    parser.add_argument("--no-triton", action="store_true", help="CUDA kernels only")
    parser.add_argument("--no-cuda", action="store_true", help="Triton kernels only")
    parser.add_argument("--rehearse", action="store_true",
                        help="instead: rehearse a fused ResNet-50's GPU path on fake CUDA tensors "
                             "and check every launch (fused_resnet.aot.rehearsal)")
    parser.add_argument("--batch", type=int, help="--rehearse: the batch (default 256)")
    parser.add_argument("--image-size", type=int, help="--rehearse: the image size (default 224)")
    args = parser.parse_args(argv)
    if args.rehearse:
        return _rehearse(args)
    if args.out is None:
        parser.error("--out is required (unless --rehearse)")

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


def _rehearse(args) -> int:
    """The rehearsal's report: on stdout, or with --out written to DIR/rehearsal.md and
    DIR/rehearsal.json and its problems on stdout. Exit status 1 when a check fails."""
    import json

    from fused_resnet.aot import rehearsal

    result = rehearsal.rehearse(
        rehearsal.COMBINATIONS + rehearsal.TRITON_BACKEND_COMBINATIONS,
        batch=args.batch or rehearsal.BATCH, image_size=args.image_size or rehearsal.IMAGE_SIZE)
    problems = result.all_problems()
    markdown = rehearsal.markdown(result, problems)
    if args.out is None:
        print(markdown)
    else:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "rehearsal.md"), "w") as f:
            f.write(markdown)
        with open(os.path.join(args.out, "rehearsal.json"), "w") as f:
            json.dump(rehearsal.to_json(result, problems), f, indent=1, default=str)
        print(markdown.split("\n## Op calls")[0])
        print(f"report in {os.path.join(args.out, 'rehearsal.md')}")
    return 1 if problems else 0


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
