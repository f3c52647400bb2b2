"""The benchmark suites still run (each case once, correctness checks included, no timing), and
the report script turns a recorded pytest-benchmark JSON into a table."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_suites_run_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         "-k", "not compiled", os.path.join(ROOT, "benchmarks")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _is_pytest_benchmark(path: str) -> bool:
    """pytest-benchmark's JSON (other results, e.g. the roofline table, have their own)."""
    with open(path) as f:
        return "benchmarks" in json.load(f)


def test_report_renders_committed_results(tmp_path):
    results = os.path.join(ROOT, "benchmarks", "results")
    recorded = sorted(f for f in os.listdir(results) if f.endswith(".json")
                      and _is_pytest_benchmark(os.path.join(results, f)))
    assert recorded, "no recorded benchmark JSON in benchmarks/results"
    for name in recorded:
        out, png = tmp_path / (name + ".md"), tmp_path / (name + ".png")
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"),
                        os.path.join(results, name), "-o", str(out), "--plot", str(png)],
                       check=True)
        text = out.read_text()
        assert "| shape | mode |" in text and "eager" in text and "x**" in text
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
