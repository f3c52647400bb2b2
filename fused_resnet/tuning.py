"""Measured choices, made once per key (like cudnn.benchmark): which implementation of a conv
to run, which Triton tile configuration to launch. Cached for the process and, for the
implementation choices, on disk too (keyed by device name, the key and the package version),
so a later process on the same GPU reuses them without measuring again.

Disk cache: $FUSED_RESNET_CACHE_DIR (default ~/.cache/fused_resnet)/tuning-<version>.json;
FUSED_RESNET_TUNING_CACHE=0 keeps choices in memory only.
"""

import contextlib
import json
import os
import tempfile
import warnings
from typing import Optional

import torch

_cache: dict = {}
_disk: Optional[dict] = None
_enumerating = False


@contextlib.contextmanager
def enumerating():
    """Static analysis (fused_resnet.aot): inside, every measured choice runs each of its
    candidates once, in order, and takes the first; nothing is timed or remembered. With kernel
    launches recorded instead of run, this lists every kernel a choice could launch."""
    global _enumerating
    previous, _enumerating = _enumerating, True
    try:
        yield
    finally:
        _enumerating = previous


def cache_path() -> Optional[str]:
    if os.environ.get("FUSED_RESNET_TUNING_CACHE", "1") == "0":
        return None
    from fused_resnet._info import __version__

    root = os.environ.get("FUSED_RESNET_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "fused_resnet"))
    return os.path.join(root, f"tuning-{__version__}.json")


def _disk_key(key) -> str:
    """The device's name makes a choice measured on one GPU model mean nothing on another."""
    index = next((k for k in key if isinstance(k, int) and not isinstance(k, bool)), None) \
        if isinstance(key, tuple) else None
    device = torch.cuda.get_device_name(index) if torch.cuda.is_available() else "cpu"
    return f"{device}|{key!r}"


_warned: set = set()


def _warn_once(what: str, message: str) -> None:
    """One warning per kind of cache problem per process: the cache is an optimisation."""
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"fused_resnet: {message}", RuntimeWarning, stacklevel=4)


def _read_cache_file(path: str) -> dict:
    """The choices a cache file holds ({} if none). A file that is not a JSON object of
    strings (truncated, corrupt, written by something else) is ignored, with one warning."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _warn_once("read", f"cannot read the tuning cache {path} ({type(exc).__name__}: "
                           f"{exc}); it is ignored and choices are measured again")
        return {}
    if not isinstance(data, dict):
        _warn_once("read", f"the tuning cache {path} is not a JSON object; it is ignored and "
                           f"choices are measured again")
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _load_disk() -> dict:
    global _disk
    if _disk is None:
        path = cache_path()
        _disk = _read_cache_file(path) if path else {}
    return _disk


def _save_disk(key, choice: str) -> None:
    """Adds one choice to the cache file: merged with what other processes wrote meanwhile,
    written to a temporary file and renamed over it (atomic: a reader never sees half a file;
    two writers lose at most each other's newest entries, never the file)."""
    path = cache_path()
    if path is None:
        return
    disk = _load_disk()
    disk[_disk_key(key)] = choice
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        merged = {**_read_cache_file(path), **disk}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:  # read-only or full: the in-memory cache still works
        _warn_once("write", f"cannot write the tuning cache {path} ({exc}); choices are kept "
                            f"in memory only")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def tuned_choice(key, candidates: dict, timer=None, persist: bool = False):
    """Name of the fastest candidate (name -> zero-argument callable) by timer(callable)
    (default: median CUDA time), measured the first time `key` is seen, then cached (also on
    disk when `persist`; a disk entry naming a candidate that is no longer offered is
    remeasured). A candidate that raises (e.g. a tile that needs more shared memory than this
    GPU has) drops out with a warning; if every one raises, the first error propagates."""
    if _enumerating:
        for fn in candidates.values():
            fn()
        return next(iter(candidates))
    if _cache.get(key) not in candidates:  # unseen, or remembered but no longer offered
        remembered = _load_disk().get(_disk_key(key)) if persist else None
        if remembered in candidates:
            _cache[key] = remembered
        else:
            _cache[key], complete = _fastest(key, candidates, timer or cuda_median_ms)
            if persist and complete:  # a choice made without a failed candidate only: once
                _save_disk(key, _cache[key])  # fixed, it is measured again by a new process
    return _cache[key]


def _fastest(key, candidates: dict, timer):
    """(the fastest candidate that ran, whether all of them ran)."""
    times, errors = {}, {}
    for name, fn in candidates.items():
        try:
            times[name] = timer(fn)
        except Exception as exc:  # noqa: BLE001 - any failure removes the candidate
            errors[name] = exc
    for name, exc in errors.items():
        warnings.warn(f"fused_resnet: candidate {name!r} for {key!r} failed and is not used: "
                      f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
    if not times:
        raise next(iter(errors.values()))
    return min(times, key=times.get), not errors


def cached(key):
    """The choice made earlier for key (this process or, for persisted keys, on disk), or
    None."""
    if key in _cache:
        return _cache[key]
    remembered = _load_disk().get(_disk_key(key)) if cache_path() else None
    if remembered is not None:
        _cache[key] = remembered  # the next call is one dict lookup
    return remembered


def choices() -> dict:
    """Every choice known: the disk cache ("<device>|<key>": choice, earlier processes too)
    and this process's ("<key>": choice, tile configurations included)."""
    known = dict(_load_disk()) if cache_path() else {}
    known.update({repr(key): str(choice) for key, choice in _cache.items()})
    return known


def cuda_median_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median time of fn() on the current CUDA stream, in ms (events; warm-up first)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def can_measure() -> bool:
    """False while a CUDA graph is being captured: timing would break the capture."""
    if _enumerating:
        return True
    return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()
