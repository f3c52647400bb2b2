"""Command line: `fused-resnet info | verify` (also `python -m fused_resnet ...`)."""

import argparse
import json
import sys


def _print_info(args) -> int:
    import fused_resnet

    data = fused_resnet.info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key == "backends":
            continue
        print(f"{key:28s} {value}")
    print("backends:")
    for name, entry in data["backends"].items():
        state = "usable" if entry["usable"] else "not usable"
        built = "built" if entry["built"] else "not built"
        extra = f" ({entry['reason']})" if entry.get("reason") else ""
        mode = f" [{entry['mode']}]" if entry.get("mode") else ""
        print(f"  {name:10s} {built}, {state}{mode}{extra}")
    return 0


def _verify(args) -> int:
    from fused_resnet.verify import verify_bn_add_relu

    ok = verify_bn_add_relu(device=args.device, verbose=True)
    print("verify: OK" if ok else "verify: MISMATCH")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device and which backends are usable")
    p_info.add_argument("--json", action="store_true", help="print the info dict as JSON")
    p_info.set_defaults(func=_print_info)
    p_verify = sub.add_parser("verify", help="check the fused ops against PyTorch on this machine")
    p_verify.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p_verify.set_defaults(func=_verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
