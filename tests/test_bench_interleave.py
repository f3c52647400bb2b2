"""`fused-resnet bench` timing on a shared machine: providers are timed round-robin after their
checks, a provider whose samples spread too far is flagged unstable and nothing built on it is
judged, results.json keeps every sample of an interrupted run, and a compiled provider compiles
once per mode. Timed calls of the planted providers sleep instead of computing (the check still
runs the real model), so the timings are known and the tests take seconds."""

import json
import time

import pytest
import torch

from fused_resnet.bench import providers, report, suite, timing

_build = providers.build
STEP_S = 0.03


def _config(tmp_path, names, repeats=5, modes=("inference",), warmup=1):
    return suite.Config(models=["resnet18"], modes=list(modes), batch_size=2, image_size=32,
                        warmup=warmup, repeats=repeats, providers=list(names),
                        out_dir=str(tmp_path), plots=False)


def _planted(log, slow_calls=(), raise_at=None):
    """A build whose providers run the real model for the check (their first call) and sleep
    STEP_S on every later call (0.15 s more on `slow_calls`, counted per provider from 0 = the
    check; 1 = the warm-up; 2.. = the rounds). raise_at: {provider: (call, exception)}."""
    def build(name, model, device, dtype):
        runner = _build(name, model, device, dtype)
        real, calls = runner.inference, iter(range(10_000))

        def inference(x):
            call = next(calls)
            log.append(name)
            if raise_at and name in raise_at and raise_at[name][0] == call:
                raise raise_at[name][1]
            if call == 0:
                return real(x)
            time.sleep(STEP_S + (0.15 if name == "fused" and call in slow_calls else 0))
        runner.inference = inference
        return runner
    return build


def test_a_noisy_provider_is_timed_round_robin_flagged_unstable_and_not_judged(tmp_path):
    log = []
    result = suite.run(_config(tmp_path, ["eager_cl", "fused"]),
                       build=_planted(log, slow_calls=(3, 5)))  # rounds 2 and 4 of 5
    # each provider: check, then (after all checks) warm-up, then 5 rounds, then peak memory
    assert log == ["eager_cl", "fused"] * 2 + ["eager_cl", "fused"] * 5 + \
        ["eager_cl", "fused"]
    rows = {r["provider"]: r for r in result["rows"]}
    noisy, quiet = rows["fused"], rows["eager_cl"]
    assert len(noisy["samples_s"]) == len(quiet["samples_s"]) == 5
    assert noisy["relative_spread"] > timing.MAX_RELATIVE_SPREAD and not noisy["stable"]
    assert quiet["stable"], quiet["samples_s"]  # 30 ms sleeps: a few % spread even when busy
    # the median ignores the two slow rounds: noise cannot turn into a speed-up
    assert noisy["median_s"] == pytest.approx(quiet["median_s"], rel=0.1)
    assert noisy["speedup_judged"] is False
    goal = next(line for line in report.goals(result) if "| inference | eager_cl | speed" in line)
    assert report.NOT_JUDGED in goal and "| met" not in goal
    assert "fused" in report.unstable_line(result) and "eager_cl" not in \
        report.unstable_line(result)
    text = report.markdown(result)
    assert "unstable**" in text and "not judged (unstable)" in text


def test_the_stability_rule():
    assert timing.summary([1.0, 1.02, 0.99, 1.01, 1.0])["stable"]
    assert not timing.summary([1.0, 1.5, 1.0, 1.5, 1.0])["stable"]
    assert not timing.summary([1.0])["stable"]  # one sample shows no spread
    assert timing.is_stable({"samples_s": [1.0, 1.01, 1.0]})  # rows recorded before the flag


def test_an_interrupted_run_keeps_every_round_it_measured(tmp_path):
    """A run cut in round 3 (an interrupt: not one provider's error) leaves results.json with
    the two complete rounds of every provider (tests/test_gpu_session.py cuts one at build)."""
    cut = (4, KeyboardInterrupt("planted: the run is cut"))  # call 4 = round 3
    config = _config(tmp_path, ["eager_cl", "fused"])
    with pytest.raises(KeyboardInterrupt):
        suite.run(config, build=_planted([], raise_at={"fused": cut}),
                  on_row=lambda partial: suite.write_json(partial, str(tmp_path)))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["provider"], r["status"], r["rounds"], len(r["samples_s"]))
            for r in saved["rows"]] == [("eager_cl", "ok", 2, 2), ("fused", "ok", 2, 2)]
    assert saved["rows"][1]["images_per_s"] > 0
    text = report.markdown(saved)  # a partial result renders
    assert "| fused | ok (" in text


def test_a_provider_that_fails_while_timed_is_reported_and_the_others_finish(tmp_path):
    crash = (3, RuntimeError("planted: kernel exploded"))  # call 3 = round 2
    result = suite.run(_config(tmp_path, ["eager_cl", "fused"], repeats=3),
                       build=_planted([], raise_at={"fused": crash}))
    rows = {r["provider"]: r for r in result["rows"]}
    assert rows["fused"]["status"] == "error" and "kernel exploded" in rows["fused"]["reason"]
    assert rows["eager_cl"]["status"] == "ok" and len(rows["eager_cl"]["samples_s"]) == 3


def test_compiled_providers_compile_once_per_mode(tmp_path, monkeypatch):
    """Check, rounds and the memory measurement all run one shape per mode: each
    torch.compile'd provider traces one graph for inference and one for training, and
    compile_freeze runs in inference only. A counting Dynamo backend stands in for Inductor
    (what is counted is Dynamo's graphs, which Inductor would each compile)."""
    graphs = []
    real_compile = torch.compile

    def counting_compile(module, mode=None, dynamic=None, options=None):
        index = len(graphs)
        graphs.append([])

        def backend(gm, example_inputs):
            graphs[index].append(module.training)
            return gm.forward
        return real_compile(module, backend=backend, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    result = suite.run(_config(tmp_path, ["compile", "compile_freeze"], repeats=1, warmup=0,
                               modes=("inference", "training")))
    torch._dynamo.reset()
    statuses = {(r["provider"], r["mode"]): r["status"] for r in result["rows"]}
    assert statuses == {("compile", "inference"): "ok", ("compile", "training"): "ok",
                        ("compile_freeze", "inference"): "ok",
                        ("compile_freeze", "training"): "unavailable"}
    # built per mode: compile (inference), compile_freeze (inference), compile (training)
    assert graphs == [[False], [False], [True]], graphs
