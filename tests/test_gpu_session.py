"""benchmarks/gpu_session.sh cannot rot: its dry run (CPU, tiny shapes, GPU steps reported as
skipped) runs every phase here, and the source stamp that decides whether a GPU session
rebuilds _C is checked: the same stamp from setup.py's build, fr.info() and the tree."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest

from fused_resnet import _build_stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
PHASES = ["build", "test", "sanitize", "ops", "model"]
# what each phase says in a dry run on a GPU-less machine
DRY_STATUS = {"build": "ok", "test": "skipped (no GPU)", "sanitize": "skipped (no GPU)",
              "ops": "ok", "model": "ok"}
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


def _session(script, out, *args, timeout=600, **env):
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
    out = tmp_path_factory.mktemp("session") / "gpu-out"
    result, summary = _session(SCRIPT, out, "all")
    return result, summary, out


def test_dry_run_every_phase(dry_run):
    result, summary, _ = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = _phase_lines(summary)
    assert list(lines) == PHASES, summary
    for phase, (status, detail) in lines.items():
        assert status == DRY_STATUS[phase], f"{phase}: {status} - {detail}"
    assert "GPU check skipped (no GPU)" in lines["build"][1]
    assert re.search(r"\d+ skipped", lines["test"][1]), lines["test"][1]
    assert "0 mismatches" in lines["sanitize"][1]
    for suite in ("bn_add_relu", "conv", "blocks"):
        assert re.search(rf"{suite} ok \(\d+ rows\)", lines["ops"][1]), lines["ops"][1]
    assert "inference ok; training ok" in lines["model"][1]


def test_dry_run_build_decision_follows_the_stamp(dry_run):
    """Installed _C built from this tree (CI installs the checkout): build skipped; otherwise
    (an editable install built before the last csrc edit, or before stamps) it would rebuild."""
    _, summary, _ = dry_run
    detail = _phase_lines(summary)["build"][1]
    # the stamp the script computed (the tree may be edited while it runs: read, not recomputed)
    tree = re.search(r"tree stamp ([0-9a-f]{20})$", summary.splitlines()[0]).group(1)
    if _installed_stamp() == tree:
        assert detail.startswith(SKIPPED), detail
    else:
        assert detail.startswith(WOULD_REBUILD) and tree in detail, detail


def test_dry_run_files(dry_run):
    _, summary, out = dry_run
    names = sorted(os.listdir(out))
    tag = re.search(r"report-(.+)\.md", " ".join(names)).group(1)
    assert tag.startswith("dryrun-cpu-")
    assert names == sorted(["summary.txt", "build.log", "test.log", "test-junit.xml",
                            "sanitize.log", "ops.log", "model.log", f"report-{tag}.md",
                            f"results-{tag}.tar.gz"])
    for name in names:  # what the device tool brings back: plain names, under 16 MiB
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and (out / name).is_file()
        assert (out / name).stat().st_size < 16 * 2**20
    junit = ET.parse(out / "test-junit.xml").getroot()
    suite = junit if junit.tag == "testsuite" else junit.find("testsuite")
    assert int(suite.get("tests")) > 0
    assert int(suite.get("skipped")) == int(suite.get("tests")), "GPU tests ran on a CPU?"
    report = (out / f"report-{tag}.md").read_text()
    for heading in ("bn_add_relu", "conv", "resnet50 block", "resnet18"):
        assert heading in report, heading
    with tarfile.open(out / f"results-{tag}.tar.gz") as tar:
        members = set(tar.getnames())
    for suite in ("bn_add_relu", "conv", "blocks"):
        for ext in ("json", "md", "png"):
            assert f"{suite}-{tag}.{ext}" in members
    for name in ("results.json", "report.md", "throughput.png", "memory.png"):
        assert f"bench-{tag}/{name}" in members
    assert "gpu_sanitize: 0 mismatches" in (out / "sanitize.log").read_text()


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
