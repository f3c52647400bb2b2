"""Do two `fused-resnet bench` runs agree? For every provider's speed-up vs eager_cl in both
runs' results.json: the speed-up's relative spread is the sum of its two rows' IQR / median; the
second run's speed-up agrees with the first's if they differ by at most the sum of both
spreads. A row the second run marked unstable is "not judged", as the bench itself reports it.

    python benchmarks/compare_runs.py QUIET/results.json LOADED/results.json

prints a markdown table.
"""

import json
import sys

from fused_resnet.bench.timing import is_stable

BASELINE = "eager_cl"


def _timed_rows(path: str) -> dict:
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {(r["mode"], r["provider"]): r for r in rows if r.get("median_s")}


def _spread(row: dict) -> float:
    return row["iqr_s"] / row["median_s"]


def _speedup(rows: dict, mode: str, provider: str):
    """(speed-up vs the baseline, its relative spread, both rows stable)."""
    row, base = rows[(mode, provider)], rows[(mode, BASELINE)]
    return (base["median_s"] / row["median_s"], _spread(row) + _spread(base),
            is_stable(row) and is_stable(base))


def compare(first: dict, second: dict) -> list:
    lines = ["| mode | provider | first: speed-up (spread) | second: speed-up (spread) | "
             "second stable | verdict |", "|---|---|---:|---:|---|---|"]
    for mode, provider in first:
        if provider == BASELINE or (mode, provider) not in second:
            continue
        r1, s1, _ = _speedup(first, mode, provider)
        r2, s2, stable = _speedup(second, mode, provider)
        agree = "agrees" if abs(r2 - r1) / r1 <= s1 + s2 else "differs"
        verdict = agree if stable else f"not judged (unstable); {agree}"
        lines.append(f"| {mode} | {provider} | {r1:.2f}x (±{100 * s1:.1f}%) | "
                     f"{r2:.2f}x (±{100 * s2:.1f}%) | {'yes' if stable else 'no'} | {verdict} |")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(compare(_timed_rows(argv[0]), _timed_rows(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
