"""The on-disk cache of measured choices is an optimisation: whatever state the file is in
(corrupt, truncated, not ours, unwritable, written by another process meanwhile), a choice is
still made, nothing crashes, and at most one warning is given."""

import json
import os
import warnings

import pytest

from fused_resnet import tuning


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSED_RESNET_TUNING_CACHE", raising=False)
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "_disk", None)
    monkeypatch.setattr(tuning, "_warned", set())
    return tmp_path


def _new_process(monkeypatch):
    """What a new process starts with: nothing in memory."""
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "_disk", None)


def _choose(key, best="a"):
    candidates = {"a": lambda: 1.0 if best == "a" else 2.0, "b": lambda: 1.0 if best == "b"
                  else 2.0}
    return tuning.tuned_choice(key, candidates, lambda fn: fn(), persist=True)


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
    with open(tuning.cache_path()) as f:  # rewritten as a valid cache with the new choices
        stored = json.load(f)
    assert sorted(stored.values()) == ["a", "b"]


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
    with open(tuning.cache_path()) as f:
        stored = json.load(f)
    assert sorted(stored.values()) == ["a", "b"]
    _new_process(monkeypatch)
    assert tuning.cached("k1") == "b" and tuning.cached("k2") == "a"


def test_choices_of_another_version_or_gpu_are_not_used(fresh, monkeypatch):
    """The file name carries the package version, each entry the device name: a cache written
    by another version, or an entry measured on another GPU model, is not reused."""
    assert "tuning-" in os.path.basename(tuning.cache_path())
    other_version = os.path.join(os.path.dirname(tuning.cache_path()), "tuning-0.0.1.json")
    os.makedirs(os.path.dirname(other_version), exist_ok=True)
    with open(other_version, "w") as f:
        json.dump({f"cpu|{'k'!r}": "a"}, f)
    _write_cache(json.dumps({f"NVIDIA H100 80GB HBM3|{'k'!r}": "a"}))
    assert tuning.cached("k") is None
    assert _choose("k", best="b") == "b"


def test_a_failing_candidate_drops_out_and_the_choice_is_not_remembered(fresh, monkeypatch):
    """A candidate that raises (a tile too big for this GPU's shared memory, a kernel that
    fails to compile) is left out with a warning; the choice among the others holds for this
    process but is not written to disk, so a later process measures again; if every candidate
    raises, the first error is the op's."""
    def broken():
        raise RuntimeError("out of resources: shared memory")

    with pytest.warns(RuntimeWarning, match="candidate 'fast' for 'k' failed"):
        choice = tuning.tuned_choice("k", {"fast": broken, "slow": lambda: 2.0},
                                     lambda fn: fn(), persist=True)
    assert choice == "slow" and tuning.cached("k") == "slow"
    _new_process(monkeypatch)
    assert tuning.cached("k") is None
    with pytest.raises(RuntimeError, match="out of resources"):
        with pytest.warns(RuntimeWarning):
            tuning.tuned_choice("k2", {"a": broken, "b": broken}, lambda fn: fn())
