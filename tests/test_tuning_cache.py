"""The on-disk cache of measured choices is an optimisation: whatever state the file is in
(corrupt, truncated, not ours, unwritable, written by another process meanwhile), a choice is
still made, nothing crashes, and at most one warning is given. An entry measured under
another software stack or on another GPU is measured again; each measurement prints one
progress line."""

import ast
import json
import os
import warnings

import pytest
import torch

from fused_resnet import tuning


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSED_RESNET_TUNING_CACHE", raising=False)
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "_disk", None)
    monkeypatch.setattr(tuning, "_warned", set())
    monkeypatch.delenv("FUSED_RESNET_TUNING_QUIET", raising=False)
    return tmp_path


def _new_process(monkeypatch):
    """What a new process starts with: nothing in memory."""
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "_disk", None)


def _choose(key, best="a"):
    candidates = {"a": lambda: 1.0 if best == "a" else 2.0, "b": lambda: 1.0 if best == "b"
                  else 2.0}
    return tuning.tuned_choice(key, candidates, lambda fn: fn(), persist=True)


def _stored():
    with open(tuning.cache_path()) as f:
        return json.load(f)


def _stored_choices():
    return [entry["choice"] for entry in _stored().values()]


def _write_cache(text: str):
    os.makedirs(os.path.dirname(tuning.cache_path()), exist_ok=True)
    with open(tuning.cache_path(), "w") as f:
        f.write(text)


@pytest.mark.parametrize("content", ["{not json", '{"x|k": "a", "trunc', "[1, 2, 3]", "42",
                                     '{"x": ["a"], "y": {"z": 1}}', ""],
                         ids=["corrupt", "truncated", "list", "number", "wrong-values",
                              "empty"])
def test_unreadable_cache_is_measured_again_with_at_most_one_warning(fresh, content):
    _write_cache(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _choose("k1", best="b") == "b"
        assert _choose("k2", best="a") == "a"
        assert tuning.cached("k3") is None
    assert len([w for w in caught if "tuning cache" in str(w.message)]) <= 1
    assert sorted(_stored_choices()) == ["a", "b"]  # rewritten as a valid cache


def test_unwritable_cache_keeps_choices_in_memory(fresh, monkeypatch):
    blocker = fresh / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(blocker / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _choose("k1", best="b") == "b"
        assert _choose("k2", best="a") == "a"
    assert len([w for w in caught if "cannot write the tuning cache" in str(w.message)]) == 1
    assert tuning.cached("k1") == "b"  # kept in memory
    assert not list(fresh.glob("**/*.tmp"))


def test_two_processes_tuning_at_once_keep_both_choices(fresh, monkeypatch):
    """Process 2 loaded the (empty) cache before process 1 saved its choice; when process 2
    saves, process 1's entry survives (merged, then renamed into place)."""
    _new_process(monkeypatch)
    tuning._load_disk()  # process 2 reads the cache: nothing yet
    disk_of_process_2 = tuning._disk
    assert _choose("k1", best="b") == "b"  # ... process 1 (same module here) saves k1
    monkeypatch.setattr(tuning, "_disk", {k: v for k, v in disk_of_process_2.items()
                                          if "k1" not in k})
    monkeypatch.setattr(tuning, "_cache", {})
    assert _choose("k2", best="a") == "a"  # process 2 saves k2
    assert sorted(_stored_choices()) == ["a", "b"]
    _new_process(monkeypatch)
    assert tuning.cached("k1") == "b" and tuning.cached("k2") == "a"


@pytest.mark.parametrize("field", ["torch", "triton", "_C", "cudnn", "fused_resnet", "sources"],
                         ids=["torch", "triton", "C-stamp", "cudnn", "version", "sources"])
def test_an_entry_of_another_stack_is_measured_again_and_overwritten(fresh, field):
    timed = []
    assert _choose("k", best="a") == "a"
    entry = _stored()[tuning._disk_key("k")]
    assert entry["stack"] == tuning.stack() and entry["choice"] == "a"
    assert field in entry["stack"], entry["stack"]
    # a value this stack cannot have (not a fixed version: the test runs on several stacks)
    other = {field: f"another {entry['stack'][field]}"}
    _write_cache(json.dumps({tuning._disk_key("k"): {**entry,
                                                     "stack": {**entry["stack"], **other}}}))
    tuning._cache.clear()
    tuning._disk = None
    assert tuning.cached("k") is None
    candidates = {"a": lambda: 2.0, "b": lambda: 1.0}
    assert tuning.tuned_choice("k", candidates, lambda fn: timed.append(fn) or fn(),
                               persist=True) == "b"
    assert len(timed) == 2  # measured again
    entry = _stored()[tuning._disk_key("k")]  # overwritten
    assert entry["choice"] == "b" and entry["stack"] == tuning.stack()


def test_a_choice_made_on_the_same_stack_is_reused_without_measuring(fresh, monkeypatch):
    assert _choose("k", best="b") == "b"
    _new_process(monkeypatch)

    def must_not_time(fn):
        raise AssertionError("measured again")

    assert tuning.tuned_choice("k", {"a": lambda: 1.0, "b": lambda: 2.0}, must_not_time,
                               persist=True) == "b"
    assert tuning.cached("k") == "b"


def test_choices_of_another_gpu_are_not_used(fresh, monkeypatch):
    """Each entry carries the device name: an entry measured on another GPU model is not
    reused (here: the CPU machine's "cpu" entries are not an H100's)."""
    entry = {"choice": "a", "stack": tuning.stack()}
    _write_cache(json.dumps({f"NVIDIA H100 80GB HBM3|{'k'!r}": entry}))
    assert tuning.cached("k") is None
    assert _choose("k", best="b") == "b"


def test_entries_of_the_old_format_are_ignored(fresh):
    """A file of plain "<device>|<key>": choice strings (before entries carried the stack)."""
    _write_cache(json.dumps({tuning._disk_key("k"): "a"}))
    assert tuning.cached("k") is None
    assert _choose("k", best="b") == "b"


def test_tile_choices_are_written_and_read_back_as_configs(fresh, monkeypatch):
    configs = {(128, 64, 64, 4, 4): lambda: 2.0, (64, 64, 64, 4, 4): lambda: 1.0}
    assert tuning.tuned_choice("tile", configs, lambda fn: fn(), persist=True) == \
        (64, 64, 64, 4, 4)
    assert _stored()[tuning._disk_key("tile")]["choice"] == "64x64x64x4x4"
    _new_process(monkeypatch)
    assert tuning.cached("tile", configs) == (64, 64, 64, 4, 4)
    assert tuning.cached("tile", {(128, 64, 64, 4, 4): None}) is None  # no longer offered


def test_one_progress_line_per_measured_key(fresh, capsys, monkeypatch):
    for _ in range(3):
        _choose("k1", best="b")
        _choose("k2", best="a")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert "'k1'" in lines[0] and ": b (a 2.000 ms, b 1.000 ms;" in lines[0], lines[0]
    assert "'k2'" in lines[1] and ": a (" in lines[1], lines[1]
    monkeypatch.setenv("FUSED_RESNET_TUNING_QUIET", "1")
    _choose("k3")
    assert capsys.readouterr().err == ""


def test_a_failing_candidate_drops_out_and_the_choice_is_remembered_with_it(fresh,
                                                                            monkeypatch):
    """A candidate that raises (a tile too big for this GPU's shared memory, a kernel that
    fails to compile) is left out with a warning; the choice among the others is remembered
    with the failure (a fixed kernel changes the stack, which measures again), unless the
    failure was running out of memory (it depends on what else held memory then: that choice
    holds for this process only); if every candidate raises, the first error is the op's."""
    def broken():
        raise RuntimeError("out of resources: shared memory")

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.warns(RuntimeWarning, match="candidate 'fast' for 'k' failed"):
        choice = tuning.tuned_choice("k", {"fast": broken, "slow": lambda: 2.0},
                                     lambda fn: fn(), persist=True)
    assert choice == "slow" and tuning.cached("k") == "slow"
    assert _stored()[tuning._disk_key("k")]["failed"] == ["fast"]
    with pytest.warns(RuntimeWarning, match="candidate 'big'"):
        assert tuning.tuned_choice("oom", {"big": out_of_memory, "small": lambda: 2.0},
                                   lambda fn: fn(), persist=True) == "small"
    _new_process(monkeypatch)
    assert tuning.cached("k") == "slow"
    assert tuning.cached("oom") is None
    with pytest.raises(RuntimeError, match="out of resources"):
        with pytest.warns(RuntimeWarning):
            tuning.tuned_choice("k2", {"a": broken, "b": broken}, lambda fn: fn())


def test_version_lives_below_info_and_tuning():
    """No import circle: the version comes from a module that imports neither."""
    import fused_resnet
    from fused_resnet import _info, _version

    assert _info.__version__ == tuning.__version__ == _version.__version__ == \
        fused_resnet.__version__
    assert _imported_modules(_version.__file__) == {"importlib"}
    assert not any(m.startswith("fused_resnet._info") for m in _imported_modules(tuning.__file__))


def _imported_modules(path: str) -> set:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(f"{node.module}.{alias.name}" if node.module.startswith("fused_resnet")
                         else node.module for alias in node.names)
    return names
