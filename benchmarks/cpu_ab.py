"""Interleaved A/B timing of ResNet-50 on a CPU: eager channels_last, torch.compile (with
freezing, inference only) and the fused model at each image size, through `fused-resnet bench`,
which checks every provider and then times them round-robin (one way to time: this script only
picks the providers and sizes). The runs of the earlier stand-alone script are kept in
benchmarks/results/cpu-ab-*.md.

    python benchmarks/cpu_ab.py [--sizes 112 224] [--rounds 7] [--batch 8] [--out DIR]

writes DIR/<size>px/ (results.json, report.md, PNGs) per size.
"""

import argparse
import os
import sys

from fused_resnet import cli

PROVIDERS = ["eager_cl", "compile", "compile_freeze", "fused"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="cpu-ab")
    args = parser.parse_args(argv)
    status = 0
    for size in args.sizes:
        status |= cli.main(["bench", "--device", "cpu", "--model", "resnet50",
                            "--image-size", str(size), "--batch-size", str(args.batch),
                            "--repeats", str(args.rounds), "--providers", *PROVIDERS,
                            "--out", os.path.join(args.out, f"{size}px")])
    return status


if __name__ == "__main__":
    sys.exit(main())
