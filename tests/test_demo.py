"""`fused-resnet demo`: the quick run writes its files; fused and unfused training agree step by
step; missing optional packages and bad flags get one clear line."""

import json
import re
import subprocess
import sys

import pytest
import torch

from fused_resnet import cli, demo

pytest.importorskip("sklearn.datasets")
pytest.importorskip("matplotlib")


def test_quick_demo_writes_json_markdown_and_plots(tmp_path):
    # cwd outside the repository root: from the root, `-m fused_resnet` imports the unbuilt tree
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fused_resnet", "demo", "--quick", "--out",
                           str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == \
        ["demo.json", "demo.md", "grad_norms.png", "training_error.png"]
    for png in ("grad_norms.png", "training_error.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "demo.json").read_text())
    assert {"config", "environment", "data", "runs", "findings", "command"} <= set(result)
    assert [r["name"] for r in result["runs"]] == ["plain-8", "resnet-8", "plain-14", "resnet-14"]
    config = demo.Config.quick()
    for run in result["runs"]:
        blocks = 3 * (run["depth"] - 2) // 6
        assert run["fused_blocks"] == blocks, run["name"]  # fused, every block
        assert len(run["step_loss"]) == len(run["step_error"]) == config.max_batches
        assert len(run["epoch_train_error"]) == config.epochs
        assert len(run["grad_norms"]) == 1 + 2 * blocks  # stem + two convs per block
        assert all(norm > 0 for _, norm in run["grad_norms"])
        assert 0 <= run["test_error"] <= 1 and 0 <= run["final_train_error"] <= 1
    markdown = (out / "demo.md").read_text()
    assert "| resnet-14 |" in markdown and "## What it shows" in markdown
    assert all(line in markdown for line in result["findings"])


@pytest.mark.parametrize("plain", [False, True], ids=["resnet", "plain"])
def test_fused_and_unfused_training_match_step_by_step(plain):
    # Same initialisation, same batches in the same order, SGD with momentum at the full rate
    # (no warm-up or decay: small steps would hide a wrong gradient). The fused kernels sum in
    # another order than PyTorch's, so each loss differs by fp32 rounding and the weights drift
    # apart by as little. Seen over these 10 steps: at most 2.4e-7, one fp32 ulp at a loss of
    # 2.3 (the drift compounds: 1e-3 by step 15 in a batch-64 16x16 run, hence few steps). 1e-5
    # leaves headroom for other summation orders (BLAS, ISA); a gradient 1% too large on one
    # tensor moves the losses by far more (seen: 2e-3 for one BN weight, 1e-2 for one conv).
    config = demo.Config.quick(depths=(8,), max_batches=10, batch_size=16, warmup_steps=0,
                               decay_after=1.0)
    data = demo.digits(config.image_size, config.seed)
    losses = {}
    for fused in (False, True):
        model = demo.build_model(8, plain=plain, fused=fused, seed=config.seed)
        assert len(getattr(model, "fused_resnet_report", {"fused": []})["fused"]) == 3 * fused
        losses[fused] = torch.tensor(demo.train(model, data, config)["step_loss"])
    assert (losses[False][1:] - losses[False][0]).abs().max() > 0.03  # it does train
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=1e-5)


def test_missing_optional_package_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    with pytest.raises(demo.MissingDependency, match=r"scikit-learn==1\.9\.1"):
        demo.require_packages()
    assert cli.main(["demo", "--quick"]) == 2
    assert "demo needs scikit-learn==1.9.1 (" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--depths", "8", "10"], "depth must be 6n\\+2"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--max-batches", "0"], "max_batches must be at least 1"),
])
def test_bad_flags_get_one_clear_line(flags, message, capsys):
    assert cli.main(["demo", "--quick", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def _run(depth, plain, error, ratio):
    return {"name": demo.run_name(depth, plain), "depth": depth, "plain": plain,
            "epoch_train_error": [0.9, error], "grad_norms": [("stem", ratio), ("last", 1.0)]}


def test_findings_say_what_the_numbers_show():
    runs = [_run(8, True, 0.05, 2.0), _run(8, False, 0.04, 1.5),
            _run(56, True, 0.60, 40.0), _run(56, False, 0.06, 3.0)]
    lines = demo.findings(runs)
    assert "plain-56 vs plain-8, last-epoch training error 60.0% vs 5.0%: higher." in lines
    assert any(line.startswith("resnet-56 vs resnet-8") and "about the same" in line
               for line in lines)
    assert "Depth 56: residual 6.0% vs plain 60.0%: residual lower." in lines
    assert any("Depth 56" in line and "40 plain, 3 residual" in line for line in lines)
