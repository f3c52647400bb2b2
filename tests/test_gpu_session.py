"""benchmarks/gpu_session.sh cannot rot: its dry run (CPU, tiny shapes, GPU steps reported as
skipped) runs every phase here and prints the visit's time plan, which must fit the device
budget; the functional check (benchmarks/gpu_check.py) runs in its CPU mode and must catch a
planted tile-local fault; the junit reader fails a GPU phase whose tests skipped for want of
a GPU; the bench keeps the rows it measured when it dies mid-run; and the source stamp that
decides whether a GPU session rebuilds _C is checked: the same stamp from setup.py's build,
fr.info() and the tree."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest
import torch

from fused_resnet import _build_stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
PHASES = ["env", "build", "check", "test_first", "model", "caches"]  # a visit: call1, call2
LATER_PHASES = ["build", "test", "sanitize", "ops"]
# what each phase says in a dry run on a GPU-less machine
DRY_STATUS = {"env": "ok", "build": "ok", "check": "ok", "test_first": "skipped (no GPU)",
              "test": "skipped (no GPU)", "sanitize": "skipped (no GPU)", "ops": "ok",
              "model": "ok", "caches": "ok"}
# the files each call brings back (the device tool returns at most 8)
CALL_PHASES = {"call1": ["env", "build", "check", "test_first"],
               "call2": ["build", "model", "caches"], "sanitize": ["build", "sanitize"],
               "ops": ["build", "ops"], "test": ["build", "test"]}
PLAN = re.compile(r"^plan: (\d+) calls, estimated (\d+) s of (\d+)$")
SKIPPED = "build skipped: installed _C is from this tree"
WOULD_REBUILD = "would rebuild (dry run, not built)"


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "OUT", "DRY_RUN", "FUSED_RESNET_BENCH_TINY")}
    # the python running these tests (a venv's) is the one the script must use
    env["PYTHON"] = sys.executable
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _session(script, out, *args, timeout=900, **env):
    result = subprocess.run(["bash", script, "--dry-run", *args], capture_output=True,
                            text=True, cwd=out.parent, env=_env(OUT=str(out), **env),
                            timeout=timeout)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return result, summary


def _phase_lines(summary: str) -> dict:
    return {m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r"^(\w+): (ok|failed|timeout|skipped \([^)]*\)) - (.*)$",
                                 summary, re.M)}


def _installed_stamp(**env):
    code = "import fused_resnet as fr; print(fr.info()['extension_source_stamp'] or '')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=_env(**env), cwd=os.path.expanduser("~")
                          ).stdout.strip()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """A visit (call1 and call2) as CI runs it: --budget alone runs both calls."""
    out = tmp_path_factory.mktemp("session") / "gpu-out"
    result, summary = _session(SCRIPT, out, "--budget", "900")
    return result, summary, out


def _dry_phases(result, summary, phases):
    """The summary's phase lines, once the run exited 0 with `phases` each in its dry-run
    status."""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = _phase_lines(summary)
    assert list(lines) == phases, summary
    for phase, (status, detail) in lines.items():
        assert status == DRY_STATUS[phase], f"{phase}: {status} - {detail}"
    return lines


def test_dry_run_every_phase(dry_run):
    result, summary, _ = dry_run
    lines = _dry_phases(result, summary, PHASES)
    assert "torch.cuda.is_available(): False" in lines["env"][1]
    assert "GPU check skipped (no GPU)" in lines["build"][1]
    assert re.search(r"\d+ checks: \d+ pass, 0 fail", lines["check"][1]), lines["check"][1]
    assert re.search(r"\d+ skipped", lines["test_first"][1]), lines["test_first"][1]
    # what a GPU run would fail on
    assert "skipped for want of a GPU" in lines["test_first"][1]
    assert re.search(r"inference ok \(eager_cl ok, fused ok\); training ok", lines["model"][1])


def test_dry_run_plan_fits_the_budget(dry_run, tmp_path):
    """The last line is the visit's plan, within the 900 device-seconds; over a budget it
    fails, with the same last line."""
    result, _, _ = dry_run
    plan = PLAN.match(result.stdout.strip().splitlines()[-1])
    assert plan, result.stdout[-2000:]
    calls, estimate, budget = (int(g) for g in plan.groups())
    assert calls == 2 and budget == 900 and estimate <= 900
    over, _ = _session(SCRIPT, tmp_path / "out", "--budget", str(estimate - 1), "env",
                       timeout=120)
    assert over.returncode == 1
    assert over.stdout.strip().splitlines()[-1] == \
        f"plan: 2 calls, estimated {estimate} s of {estimate - 1}"


def test_dry_run_files(dry_run):
    _, summary, out = dry_run
    names = sorted(os.listdir(out))
    tag = re.search(r"caches-(.+)\.tar\.gz", " ".join(names)).group(1)
    assert tag.startswith("dryrun-cpu-")
    produced = {"env": ["env.log"], "build": ["build.log"],
                "check": ["check.log", "gpu-check.jsonl"],
                "test_first": ["test_first.log", "test_first-junit.xml"],
                "test": ["test.log", "test-junit.xml"], "sanitize": ["sanitize.log"],
                "ops": ["ops.log", f"report-{tag}.md", f"results-{tag}.tar.gz"],
                "model": ["model.log"] + [f"bench-{m}/{f}" for m in ("inference", "training")
                                          for f in ("results.json", "report.md")],
                "caches": [f"caches-{tag}.tar.gz"]}
    files = sorted(os.path.relpath(os.path.join(d, f), out)
                   for d, _, fs in os.walk(out) for f in fs)
    ran = [f for p in PHASES for f in produced[p]]
    assert files == sorted(["summary.txt"] + ran), files
    for call, phases in CALL_PHASES.items():  # what one call returns: at most 8 files
        assert 1 + len({f for p in phases for f in produced[p]}) <= 8, call
    _returnable(out, files)
    _all_skipped(out / "test_first-junit.xml")
    rows = json.loads((out / "bench-inference" / "results.json").read_text())["rows"]
    assert [(r["provider"], r["status"]) for r in rows] == [("eager_cl", "ok"), ("fused", "ok")]
    with tarfile.open(out / f"caches-{tag}.tar.gz") as tar:
        assert {"tuning", "triton"} <= {m.split("/")[0] for m in tar.getnames()}


def _returnable(out, files):
    """What the device tool brings back: plain names, two folders down at most, < 16 MiB."""
    for name in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?", name), name
        assert (out / name).stat().st_size < 16 * 2**20


def _all_skipped(junit_path):
    junit = ET.parse(junit_path).getroot()
    suite = junit if junit.tag == "testsuite" else junit.find("testsuite")
    assert int(suite.get("tests")) > 0
    assert int(suite.get("skipped")) == int(suite.get("tests")), "GPU tests ran on a CPU?"


@pytest.mark.slow
def test_dry_run_later_phases(tmp_path):
    """A later visit's phases (one call each there), here in one dry run: the other GPU
    tests, the sanitizer's case list on the CPU, the op benchmarks and their report."""
    out = tmp_path / "gpu-out"
    result, summary = _session(SCRIPT, out, "test", "sanitize", "ops")
    lines = _dry_phases(result, summary, LATER_PHASES)
    assert "0 mismatches" in lines["sanitize"][1]
    for suite in ("bn_add_relu", "conv", "blocks"):
        assert re.search(rf"{suite} ok \(\d+ rows\)", lines["ops"][1]), lines["ops"][1]
    files = sorted(os.path.relpath(os.path.join(d, f), out)
                   for d, _, fs in os.walk(out) for f in fs)
    tag = re.search(r"report-(.+)\.md", " ".join(files)).group(1)
    assert files == sorted(["summary.txt", "build.log", "test.log", "test-junit.xml",
                            "sanitize.log", "ops.log", f"report-{tag}.md",
                            f"results-{tag}.tar.gz"]), files
    _returnable(out, files)
    _all_skipped(out / "test-junit.xml")
    report = (out / f"report-{tag}.md").read_text()
    for heading in ("bn_add_relu", "conv", "resnet50 block"):
        assert heading in report, heading
    with tarfile.open(out / f"results-{tag}.tar.gz") as tar:
        members = set(tar.getnames())
    for suite in ("bn_add_relu", "conv", "blocks"):
        for ext in ("json", "md", "png"):
            assert f"{suite}-{tag}.{ext}" in members
    assert "gpu_sanitize: 0 mismatches" in (out / "sanitize.log").read_text()


def test_dry_run_check_lines(dry_run):
    """One JSON line per check: the BN pieces of both backends, every conv op flavour, the
    Triton conv once per tile configuration, the library path under both BN backends;
    CUTLASS reported skipped (CPU)."""
    _, _, out = dry_run
    rows = [json.loads(line) for line in (out / "gpu-check.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows} <= {"pass", "skipped"}, \
        [r for r in rows if r["status"] not in ("pass", "skipped")][:3]
    bn = {(r["piece"], r["backend"], r["layout"]) for r in rows if r["kind"] == "bn"}
    assert len(bn) == 4 * 2 * 2
    conv = [r for r in rows if r["kind"] == "conv"]
    assert {r["flavour"] for r in conv} == {"epilogue_relu", "epilogue_residual",
                                            "epilogue_plain", "dual", "bn_stats",
                                            "bn_relu_conv"}
    assert {(r["path"], r["backend"]) for r in conv if r["status"] == "pass"} >= {
        ("triton", None), ("library", "cpp"), ("library", "triton")}
    assert all(r["status"] == "skipped" for r in conv if r["path"] == "cutlass")
    tiles = {tuple(r["config"]) for r in conv if r["path"] == "triton"}
    assert len(tiles) > 1, tiles  # every configuration the tuner measures, not one


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_catches_one_bad_tile(monkeypatch):
    """A Triton conv that gets one 64x16 block of its 288x64 output 3% wrong (everything else
    right) fails the check, though its normwise error is far under the tuner's 3e-2 agreement
    bound; the library path of the same case passes."""
    from fused_resnet.kernels import conv as kconv

    gpu_check = _load_gpu_check()
    original = kconv.conv2d_nhwc

    def one_bad_tile(*args, **kwargs):
        out, stats = original(*args, **kwargs)
        rows = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])  # a view of out (NHWC)
        rows[64:128, 16:32] *= 1.03
        return out, stats

    monkeypatch.setattr(kconv, "conv2d_nhwc", one_bad_tile)
    case = gpu_check.ConvCase("epilogue_residual", (2, 16, 12, 12), (64, 16, 1, 1), 1, 0)
    rows = []
    gpu_check._conv_check(1, case, torch.float32, "cpu").run(rows.append)
    triton = [r for r in rows if r["path"] == "triton"]
    assert triton and all(r["status"] == "fail" for r in triton), triton
    assert all(r["worst_at"] == "rows 64-127, channels 0-31" for r in triton)
    assert all(r["normwise"] < 3e-2 for r in triton)
    assert [r["status"] for r in rows if r["path"] == "library"] == ["pass", "pass"]
    assert gpu_check.exit_status({"pass": 2, "fail": 1}, dry_run=True) == 1


def test_check_past_its_time_limit_reports_what_did_not_run(tmp_path):
    gpu_check = _load_gpu_check()
    jsonl = tmp_path / "check.jsonl"
    code = gpu_check.main(["--dry-run", "--out", str(jsonl), "--time-limit", "0",
                           "--only", r"^bn_2x3x5x7\+0_float32"])
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert code == 3 and [r["status"] for r in rows] == ["not run", "not run"]


def test_local_error_names_the_block():
    gpu_check = _load_gpu_check()
    want = torch.randn(2, 40, 9, 9, dtype=torch.float64)
    assert gpu_check.local_error(want.clone(), want, want.abs())[0] == 0.0
    got = want.clone()
    got[1, 35, 2, 0] = float("nan")  # pixel row 81 + 2 * 9 = 99 of 162, channel 35 of 40
    error, where = gpu_check.local_error(got, want, want.abs())
    assert error == float("inf") and where == "rows 64-127, channels 32-63"


def _junit(tmp_path, cases):
    body = "".join(
        f'<testcase classname="tests.t" name="{name}">'
        + (f'<skipped type="pytest.skip" message="{reason}"/>' if reason else "")
        + "</testcase>" for name, reason in cases)
    path = tmp_path / "junit.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" '
                    f'tests="{len(cases)}">{body}</testsuite></testsuites>')
    return str(path)


@pytest.mark.parametrize("cases, ok, says", [
    ([("a", None), ("b", None), ("c", "needs two CUDA devices")], True, "2 GPU tests ran"),
    ([("a", None), ("b", "no CUDA device")], False, "1 GPU tests skipped for want of a GPU"),
    ([("a", None), ("b", "triton backend on cuda: TRITON_INTERPRET=1 is set")], False,
     "skipped for want of a GPU"),
    ([("a", "_C was built without the CUTLASS conv kernels")], False, "want of a GPU"),
    ([("a", "long hypothesis profile: run with -m slow")], False, "not one GPU test ran"),
    ([], False, "not one GPU test ran"),
])
def test_junit_reader_fails_gpu_phases_that_tested_nothing(tmp_path, cases, ok, says):
    spec = importlib.util.spec_from_file_location(
        "gpu_junit", os.path.join(ROOT, "benchmarks", "gpu_junit.py"))
    gpu_junit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_junit)
    got_ok, line = gpu_junit.verdict(_junit(tmp_path, cases))
    assert got_ok is ok and says in line, line
    assert gpu_junit.main([_junit(tmp_path, cases)]) == (0 if ok else 1)
    assert gpu_junit.verdict(str(tmp_path / "missing.xml"))[0] is False


def test_bench_keeps_rows_measured_before_a_crash(tmp_path, monkeypatch):
    """results.json is rewritten after every check and every timing round: a run cut in its
    second round (an interrupt, which no per-provider error handling catches) keeps the first
    round of every provider. (tests/test_bench_interleave.py: the same through suite.run.)"""
    from fused_resnet import cli
    from fused_resnet.bench import providers

    build = providers.build

    def crashing(name, *args, **kwargs):
        runner = build(name, *args, **kwargs)
        if name == "fused":
            real, calls = runner.inference, iter(range(100))

            def inference(x):  # call 0: the check, 1: the warm-up, 2: round 1, 3: round 2
                if next(calls) == 3:
                    raise KeyboardInterrupt("planted: the run is cut")
                return real(x)
            runner.inference = inference
        return runner

    monkeypatch.setattr(providers, "build", crashing)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt, match="planted"):
        cli.main(["bench", "--device", "cpu", "--model", "resnet18", "--dtype", "fp32",
                  "--batch-size", "2", "--image-size", "32", "--mode", "inference",
                  "--providers", "eager_cl", "fused", "--warmup", "1", "--repeats", "2",
                  "--iters", "1", "--check-batch", "2", "--no-plots", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert [(r["provider"], r["status"], len(r["samples_s"])) for r in saved["rows"]] == \
        [("eager_cl", "ok", 1), ("fused", "ok", 1)]
    assert saved["rows"][0]["images_per_s"] > 0 and saved["command"].startswith("fused-resnet")
    assert not (out / "results.json.tmp").exists()


def test_dry_run_build_decision_follows_the_stamp(dry_run):
    """Installed _C built from this tree (CI installs the checkout): build skipped; otherwise
    (an editable install built before the last csrc edit, or before stamps) it would rebuild."""
    _, summary, _ = dry_run
    detail = _phase_lines(summary)["build"][1]
    # the stamp the script computed (the tree may be edited while it runs: read, not recomputed)
    tree = re.search(r"tree stamp ([0-9a-f]{20})\b", summary.splitlines()[0]).group(1)
    if _installed_stamp() == tree:
        assert detail.startswith(SKIPPED), detail
    else:
        assert detail.startswith(WOULD_REBUILD) and tree in detail, detail


def test_source_stamp_is_content_of_csrc_and_setup(tmp_path):
    tree = tmp_path / "tree"
    (tree / "csrc" / "cpu").mkdir(parents=True)
    (tree / "setup.py").write_text("setup()\n")
    (tree / "csrc" / "ops.cpp").write_text("int x;\n")
    (tree / "csrc" / "cpu" / "a.cpp").write_text("int a;\n")
    (tree / "README.md").write_text("docs\n")
    first = _build_stamp.source_stamp(str(tree))
    assert re.fullmatch(r"[0-9a-f]{20}", first)
    os.utime(tree / "csrc" / "ops.cpp", (1, 1))          # times do not count
    (tree / "README.md").write_text("other docs\n")      # nor files outside csrc/ + setup.py
    assert _build_stamp.source_stamp(str(tree)) == first
    (tree / "csrc" / "cpu" / "a.cpp").write_text("int a = 1;\n")
    second = _build_stamp.source_stamp(str(tree))
    assert second != first
    (tree / "csrc" / "cpu" / "b.h").write_text("")       # a new file counts
    assert _build_stamp.source_stamp(str(tree)) != second
    # the command line prints the same stamp, with no package import
    printed = subprocess.run([sys.executable, os.path.join(ROOT, "fused_resnet",
                                                           "_build_stamp.py"), str(tree)],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed == _build_stamp.source_stamp(str(tree))
    assert 'const char fused_resnet_source_stamp[] = "abc";' in _build_stamp.stamp_source("abc")


def _copy_tree(dst):
    """The parts of the source tree that building _C and running the script need."""
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "build")
    dst.mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst / name)
    for name in ("csrc", "fused_resnet", "kernels", "benchmarks", "tests"):
        shutil.copytree(os.path.join(ROOT, name), dst / name, ignore=ignore)
    return dst


def test_changed_tree_would_rebuild(tmp_path):
    """A tree whose csrc differs from what the installed _C was built from: the build phase
    says it would rebuild (a dry run never builds)."""
    tree = _copy_tree(tmp_path / "tree")
    with open(tree / "csrc" / "ops.cpp", "a") as f:
        f.write("\n// an edit the installed _C was not built from\n")
    result, summary = _session(str(tree / "benchmarks" / "gpu_session.sh"), tmp_path / "out",
                               "build", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    status, detail = _phase_lines(summary)["build"]
    assert status == "ok" and detail.startswith(WOULD_REBUILD), detail
    assert _build_stamp.source_stamp(str(tree)) in detail


@pytest.mark.slow
def test_built_extension_carries_the_tree_stamp(tmp_path):
    """setup.py compiles the tree's stamp into _C (a CPU-only build of a copy of the tree);
    fr.info() reports it; the script then skips the build; after a csrc edit it would rebuild,
    and rebuilding recompiles only the edited file and the stamp's own source."""
    tree = _copy_tree(tmp_path / "tree")
    build = [sys.executable, "setup.py", "build_ext", "--inplace"]
    env = _env(FUSED_RESNET_SKIP_CUDA="1", MAX_JOBS="2")
    subprocess.run(build, cwd=tree, env=env, check=True, capture_output=True, timeout=900)
    stamp = _build_stamp.source_stamp(str(tree))
    assert _installed_stamp(PYTHONPATH=str(tree)) == stamp

    result, summary = _session(str(tree / "benchmarks" / "gpu_session.sh"), tmp_path / "out1",
                               "build", timeout=300, PYTHONPATH=str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    status, detail = _phase_lines(summary)["build"]
    assert status == "ok" and detail.startswith(SKIPPED) and stamp in detail, detail

    with open(tree / "csrc" / "cpu" / "bn_add_relu.cpp", "a") as f:
        f.write("\n// edited\n")
    result, summary = _session(str(tree / "benchmarks" / "gpu_session.sh"), tmp_path / "out2",
                               "build", timeout=300, PYTHONPATH=str(tree))
    assert _phase_lines(summary)["build"][1].startswith(WOULD_REBUILD)

    rebuilt = subprocess.run(build, cwd=tree, env=env, check=True, capture_output=True,
                             text=True, timeout=900)
    log = rebuilt.stdout + rebuilt.stderr
    compiled = re.findall(r"-c (\S+\.(?:cpp|cu)) -o", log)
    assert sorted(os.path.basename(p) for p in compiled) == \
        ["bn_add_relu.cpp", "fused_resnet_source_stamp.cpp"], compiled
    assert _installed_stamp(PYTHONPATH=str(tree)) == _build_stamp.source_stamp(str(tree)) != stamp


def test_script_usage_errors(tmp_path):
    result = subprocess.run(["bash", SCRIPT, "--dry-run", "nonsense"], capture_output=True,
                            text=True, env=_env(OUT=str(tmp_path / "o")))
    assert result.returncode == 2 and "unknown argument" in result.stderr
    result = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sanitize" in result.stdout and "--dry-run" in result.stdout


def test_sanitize_cases_cover_the_large_cutlass_tile():
    """The compute-sanitizer program runs the large-tile CUTLASS kernels (the ones batch 256
    runs), in both dtypes, with and without ReLU, and ConvBNfprop (checked against the plan
    in its dry run)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import gpu_sanitize
    finally:
        sys.path.pop(0)
    large = [c for c in gpu_sanitize.CUTLASS_CASES if c[-1] == gpu_sanitize.LARGE]
    assert {c[9] for c in large} == {True, False}  # ReLU and identity epilogues
    assert any(c[2] % 8 == 0 for c in large)       # bn_relu_conv2d_cutlass runs large too
    assert any(c[2] == 3 for c in large)           # the padded stem
