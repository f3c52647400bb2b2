"""Command line: `fused-resnet info | verify | bench | tune | demo` (also `python -m
fused_resnet ...`)."""

import argparse
import json
import sys

from fused_resnet import tune


def _print_info(args) -> int:
    import fused_resnet

    data = fused_resnet.info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key in ("backends", "conv_choices"):
            continue
        print(f"{key:28s} {value}")
    print("backends:")
    for name, entry in data["backends"].items():
        state = "usable" if entry["usable"] else "not usable"
        built = "built" if entry["built"] else "not built"
        extra = f" ({entry['reason']})" if entry.get("reason") else ""
        mode = f" [{entry['mode']}]" if entry.get("mode") else ""
        print(f"  {name:12s} {built}, {state}{mode}{extra}")
    if data["conv_choices"]:
        print(f"measured choices (disk cache {data['tuning_cache']}, and this process):")
        for key, choice in data["conv_choices"].items():
            print(f"  {choice:8s} {key}")
    return 0


def _verify(args) -> int:
    from fused_resnet.verify import verify_bn_add_relu

    ok = verify_bn_add_relu(device=args.device, verbose=True)
    print("verify: OK" if ok else "verify: MISMATCH")
    return 0 if ok else 1


def _bench(args) -> int:
    import torch

    from fused_resnet.bench import providers, report, suite

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = args.providers or list(providers.defaults(device))
    if args.max_autotune and "compile_max" not in names:
        names.append("compile_max")
    config = suite.Config.defaults_for(
        device, models=args.model, modes=args.mode, dtype=args.dtype,
        batch_size=args.batch_size, image_size=args.image_size, providers=names,
        warmup=args.warmup, repeats=args.repeats, iters=args.iters,
        check_batch=args.check_batch, out_dir=args.out, plots=not args.no_plots)
    print(f"fused-resnet bench: {', '.join(config.models)} / {', '.join(config.modes)} on "
          f"{device}, {config.dtype}, batch {config.batch_size}, {config.image_size}px; "
          f"providers: {', '.join(names)}", flush=True)
    command = "fused-resnet " + " ".join(args.argv)
    result = suite.run(config, on_row=lambda partial: suite.write_json(partial, config.out_dir,
                                                                       command))
    paths = suite.write(result, config.out_dir, command=command)
    print("\n".join(report.tables(result) + report.goals(result)))
    print("\nwritten: " + ", ".join(paths.values()))
    bad = [f"{r['model']} {r['mode']} {r['provider']}" for r in result["rows"]
           if r["status"] in ("wrong", "error")]
    if bad:
        print("providers that failed the correctness check: " + "; ".join(bad))
    if report.unstable_line(result):  # last, where the user looks
        print(report.unstable_line(result))
    return 1 if bad else 0


def _add_bench_parser(sub) -> None:
    from fused_resnet.bench import providers, suite

    p = sub.add_parser("bench", help="time eager, torch.compile and fused ResNets (checked "
                                     "for correctness first); JSON, markdown and PNG plots")
    p.add_argument("--model", nargs="+", choices=suite.MODELS, default=None,
                   help="default: resnet50")
    p.add_argument("--mode", nargs="+", choices=suite.MODES, default=None,
                   help="default: both")
    p.add_argument("--dtype", choices=sorted(suite.DTYPES), default=None,
                   help="default: bf16 on a GPU, fp32 on a CPU (bf16/fp16 run under autocast)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 GPU, 8 CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 GPU, 112 CPU")
    p.add_argument("--providers", nargs="+", choices=providers.ALL_PROVIDERS, default=None,
                   help=f"default on a GPU: {' '.join(providers.DEFAULT_PROVIDERS)}; on a CPU: "
                        f"{' '.join(providers.CPU_DEFAULT_PROVIDERS)}")
    p.add_argument("--max-autotune", action="store_true",
                   help="also torch.compile(mode='max-autotune') (slow to compile)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help="timing rounds: providers are timed round-robin, one sample each per "
                        "round (default 7 CPU, 10 GPU)")
    p.add_argument("--iters", type=int, default=None, help="calls per timed sample")
    p.add_argument("--check-batch", type=int, default=None,
                   help="batch of the correctness check: inference compares the first this "
                        "many images of the timing batch, training runs a step at this batch "
                        "(default: the timing batch on a CPU, 8 on a GPU, where the training "
                        "check then compiles a second graph)")
    p.add_argument("--out", default="fused-resnet-bench", help="output directory")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=_bench)


def _demo(args) -> int:
    from fused_resnet import demo

    overrides = {k: v for k, v in dict(
        depths=args.depths, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, image_size=args.image_size,
        max_batches=args.max_batches, seed=args.seed, threads=args.threads).items()
        if v is not None}
    overrides.update(fused=not args.unfused, out_dir=args.out)
    try:  # bad flags and missing optional packages: one clear line, no traceback
        config = demo.Config.quick(**overrides) if args.quick else demo.Config(**overrides)
        demo.require_packages()
    except (demo.MissingDependency, ValueError) as e:
        print(f"fused-resnet demo: {e}", file=sys.stderr)
        return 2
    demo.main(config, command="fused-resnet " + " ".join(args.argv))
    return 0


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train plain and residual CIFAR-style nets (fused) on "
                                    "scikit-learn's digits: training error per depth and "
                                    "gradient norms at initialisation; PNG, markdown, JSON")
    p.add_argument("--quick", action="store_true",
                   help="under a minute: depths 8 and 14, one epoch of 4 batches, 8x8 images")
    p.add_argument("--depths", nargs="+", type=int, default=None,
                   help="6n+2 each (default: 8 20 56)")
    p.add_argument("--epochs", type=int, default=None, help="default: 8")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64")
    p.add_argument("--lr", type=float, default=None, help="default: 0.05")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps at 0.1x the rate first (default: 24, one epoch)")
    p.add_argument("--image-size", type=int, default=None,
                   help="digits resized to this (default: 16; 8 is the original)")
    p.add_argument("--max-batches", type=int, default=None, help="per epoch (default: all)")
    p.add_argument("--seed", type=int, default=None, help="default: 0")
    p.add_argument("--unfused", action="store_true", help="train the unfused models instead")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--out", default="fused-resnet-demo", help="output directory")
    p.set_defaults(func=_demo)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device and which backends are usable")
    p_info.add_argument("--json", action="store_true", help="print the info dict as JSON")
    p_info.set_defaults(func=_print_info)
    p_verify = sub.add_parser("verify", help="check the fused ops against PyTorch on this machine")
    p_verify.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p_verify.set_defaults(func=_verify)
    _add_bench_parser(sub)
    tune.add_parser(sub)
    _add_demo_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
