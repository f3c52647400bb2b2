"""The benchmark suites still run (each case once, correctness checks included, no timing), the
report script turns a recorded pytest-benchmark JSON into a table, and compare_runs judges two
bench runs' agreement."""

import json
import os
import subprocess
import sys

from fused_resnet.bench.timing import MAX_RELATIVE_SPREAD

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


def _bench_results(path, speedups_iqr):
    """A results.json of one mode: eager_cl at 1 s (IQR 2%), then each provider at the given
    (speed-up, IQR / median)."""
    rows = [{"mode": "training", "provider": "eager_cl", "median_s": 1.0, "iqr_s": 0.02,
             "stable": True}]
    rows += [{"mode": "training", "provider": name, "median_s": 1.0 / speedup,
              "iqr_s": spread / speedup, "stable": spread <= MAX_RELATIVE_SPREAD}
             for name, (speedup, spread) in speedups_iqr.items()]
    path.write_text(json.dumps({"rows": rows}))
    return str(path)


def test_compare_runs_judges_agreement_within_the_spreads(tmp_path):
    quiet = _bench_results(tmp_path / "quiet.json", {"fused": (1.20, 0.02), "compile": (1.0, 0.02)})
    second = _bench_results(tmp_path / "second.json",
                            {"fused": (1.10, 0.02), "compile": (1.05, 0.30)})
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_runs.py"),
                             quiet, second], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    verdicts = {line.split("|")[2].strip(): line.split("|")[-2].strip()
                for line in result.stdout.splitlines()[2:]}
    # 1.20x vs 1.10x differ by 8%, beyond 2% + 2% (each run's rows) + 2% + 2%
    assert verdicts["fused"] == "differs"
    # the second compile row's IQR is 30% of its median: unstable, not judged
    assert verdicts["compile"].startswith("not judged (unstable)")


def test_cpu_page_faults_measures_each_model_and_writes_its_rows():
    """benchmarks/cpu_page_faults.py: one step per model (a tiny ResNet-50 input), the samples
    it records, and the table rows it writes from them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cpu_page_faults", os.path.join(ROOT, "benchmarks", "cpu_page_faults.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    samples = script.measure(image_size=32, batch=2, rounds=1, providers=["eager_cl", "fused"])
    assert set(samples) == {"eager_cl", "fused"}
    for values in samples.values():
        (ms, faults, sys_s), = values
        assert ms > 0 and faults >= 0 and sys_s >= 0
    rows = script.summary_rows("alone", {"eager_cl": [(100.0, 2048, 0.1)],
                                         "fused": [(80.0, 1024, 0.0)]})
    assert rows == ["| alone | eager_cl | 100 (100-100) | 1.00x | 2048 (2048-2048) | 8 | 0.10 |",
                    "| alone | fused | 80 (80-80) | 1.25x | 1024 (1024-1024) | 4 | 0.00 |"]
