"""Measured choices, made once per key (like cudnn.benchmark): which implementation of a conv
to run, which Triton tile configuration to launch. Cached for the process and on disk, so a
later process on the same GPU and software stack reuses them without measuring again.

A key holds everything about the call that changes what the candidates compute or how fast
they run (the callers build it: ops.conv.choose_path, kernels.conv._choose_config). The disk
entry adds the GPU's name and the software stack (stack(): package version, torch, CUDA,
cuDNN, Triton, the _C build stamp, a hash of the kernel and op sources): an entry measured
under another stack is ignored, measured again and overwritten.

Disk cache: $FUSED_RESNET_CACHE_DIR (default ~/.cache/fused_resnet)/tuning.json;
FUSED_RESNET_TUNING_CACHE=0 keeps choices in memory only. Each measurement prints one line
on stderr (what, the candidates' times, the choice, seconds); FUSED_RESNET_TUNING_QUIET=1
silences them.

Measuring happens on CUDA devices only (measured_on); tests drive it on a CPU by replacing
measured_on, can_measure and cuda_median_ms (tests/test_tune.py).
"""

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Callable, Iterable, Optional

import torch

from fused_resnet._version import __version__

CACHE_FILE = "tuning.json"

_cache: dict = {}  # key -> choice, this process
_disk: Optional[dict] = None  # disk key -> entry, as read from the cache file (every stack)
_stack: Optional[dict] = None
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


# ---- the software stack a measurement belongs to ------------------------------------------------
def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # noqa: BLE001 - not installed, or broken: no Triton in the stack
        return None
    return triton.__version__


def _cudnn_version() -> Optional[int]:
    try:
        return torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - no cuDNN library in this torch build
        return None


def _sources_hash() -> str:
    """Hash of the Python sources of the kernels and ops (what the candidates run): an edited
    kernel in a development tree is measured again, as a new _C build stamp is."""
    import importlib.util

    digest = hashlib.sha256()
    for package in ("fused_resnet.kernels", "fused_resnet.ops"):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for name in sorted(os.listdir(root)):
                if name.endswith(".py"):
                    with open(os.path.join(root, name), "rb") as f:
                        digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def stack() -> dict:
    """Everything outside a key that a measured choice depends on (computed once)."""
    global _stack
    if _stack is None:
        from fused_resnet import _extension

        _stack = {"fused_resnet": __version__, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "cudnn": _cudnn_version(),
                  "triton": _triton_version(), "_C": _extension.source_stamp(),
                  "sources": _sources_hash()}
    return _stack


# ---- the disk cache ---------------------------------------------------------------------------
def cache_path() -> Optional[str]:
    if os.environ.get("FUSED_RESNET_TUNING_CACHE", "1") == "0":
        return None
    root = os.environ.get("FUSED_RESNET_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "fused_resnet"))
    return os.path.join(root, CACHE_FILE)


def _device_name(key) -> str:
    """The name of the GPU a key's device index names (a choice measured on one GPU model
    means nothing on another); "cpu" without CUDA."""
    index = next((k for k in key if isinstance(k, int) and not isinstance(k, bool)), None) \
        if isinstance(key, tuple) else None
    return torch.cuda.get_device_name(index) if torch.cuda.is_available() else "cpu"


def _disk_key(key) -> str:
    return f"{_device_name(key)}|{key!r}"


def label(choice) -> str:
    """How a choice is written down: a path name as it is, a tile config as 128x64x64x4x4."""
    return choice if isinstance(choice, str) else "x".join(str(c) for c in choice)


_warned: set = set()


def _warn_once(what: str, message: str) -> None:
    """One warning per kind of cache problem per process: the cache is an optimisation."""
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"fused_resnet: {message}", RuntimeWarning, stacklevel=4)


def _is_entry(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("choice"), str) \
        and isinstance(value.get("stack"), dict)


def _read_cache_file(path: str) -> dict:
    """The entries a cache file holds ({} if none). A file that is not a JSON object is
    ignored, with one warning; values that are not entries (another format) are dropped."""
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
    return {k: v for k, v in data.items() if isinstance(k, str) and _is_entry(v)}


def _load_disk() -> dict:
    global _disk
    if _disk is None:
        path = cache_path()
        _disk = _read_cache_file(path) if path else {}
    return _disk


def _remembered(key) -> Optional[str]:
    """The label of key's choice on disk, if it was measured on this GPU model and stack."""
    if cache_path() is None:
        return None
    entry = _load_disk().get(_disk_key(key))
    if entry is None or entry["stack"] != stack():
        return None
    return entry["choice"]


def _save_disk(key, choice, **details) -> None:
    """Writes key's entry (the choice, this stack, and `details`: times, failures) into the
    cache file, replacing any older entry of the key: merged with what other processes wrote
    meanwhile, written to a temporary file and renamed over it (atomic: a reader never sees
    half a file; two writers lose at most each other's newest entries, never the file)."""
    path = cache_path()
    if path is None:
        return
    disk = _load_disk()
    disk[_disk_key(key)] = {"choice": label(choice), "stack": stack(), **details}
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


# ---- progress lines ---------------------------------------------------------------------------
def _print_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_reporter: Callable[[str], None] = _print_line


@contextlib.contextmanager
def reporting(write: Callable[[str], None]):
    """Progress lines go to write(line) inside (the tune command's progress bar)."""
    global _reporter
    previous, _reporter = _reporter, write
    try:
        yield
    finally:
        _reporter = previous


def _report(what: str, times: dict, errors: dict, left_out: Iterable[str], choice,
            seconds: float) -> None:
    if os.environ.get("FUSED_RESNET_TUNING_QUIET", "0") not in ("", "0"):
        return
    parts = [f"{label(name)} {ms:.3f} ms" for name, ms in times.items()]
    parts += [f"{label(name)} failed" for name in errors]
    parts += [f"{name} left out" for name in left_out]
    _reporter(f"fused_resnet tuning: {what}: {label(choice)} ({', '.join(parts)}; "
              f"{seconds:.1f} s)")


# ---- choosing ---------------------------------------------------------------------------------
def tuned_choice(key, candidates: dict, timer=None, persist: bool = False, *,
                 describe: Optional[Callable[[], str]] = None,
                 prepare: Optional[Callable[[], None]] = None,
                 left_out: Iterable[str] = ()):
    """The fastest candidate (a key of `candidates`: name -> zero-argument callable) by
    timer(callable) (default: median CUDA time), measured the first time `key` is seen, then
    cached (also on disk when `persist`; a disk entry naming a candidate that is no longer
    offered, or measured under another stack, is measured again and overwritten).

    Measuring prints one progress line naming describe() (default: the key) and calls
    prepare() first (compiling the candidates in parallel, say). left_out: names the caller dropped
    before (e.g. a kernel that disagreed with the library's), shown and recorded. A candidate
    that raises (e.g. a tile that needs more shared memory than this GPU has) drops out with
    a warning; if every one raises, the first error propagates."""
    if _enumerating:
        for fn in candidates.values():
            fn()
        return next(iter(candidates))
    if _cache.get(key) in candidates:
        return _cache[key]
    by_label = {label(c): c for c in candidates}
    remembered = by_label.get(_remembered(key)) if persist else None
    if remembered is not None:
        _cache[key] = remembered
        return remembered
    start = time.perf_counter()
    if prepare is not None:
        prepare()
    times, errors = _measure(candidates, timer or cuda_median_ms)
    _warn_failures(key, errors)
    if not times:
        raise next(iter(errors.values()))
    choice = min(times, key=times.get)
    seconds = time.perf_counter() - start
    left_out = sorted(left_out)
    _report(describe() if describe else repr(key), times, errors, left_out, choice, seconds)
    _cache[key] = choice
    if persist and not _transient(errors):
        _save_disk(key, choice, times_ms={label(c): round(t, 4) for c, t in times.items()},
                   failed=sorted(label(c) for c in errors), left_out=left_out,
                   seconds=round(seconds, 2))
    return choice


def _measure(candidates: dict, timer):
    """({candidate: time} of those that ran, {candidate: exception} of those that raised)."""
    times, errors = {}, {}
    for name, fn in candidates.items():
        try:
            times[name] = timer(fn)
        except Exception as exc:  # noqa: BLE001 - any failure removes the candidate
            errors[name] = exc
    return times, errors


def _warn_failures(key, errors: dict) -> None:
    for name, exc in errors.items():
        warnings.warn(f"fused_resnet: candidate {name!r} for {key!r} failed and is not used: "
                      f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=4)


def _transient(errors: dict) -> bool:
    """Whether a failure depends on the moment rather than on the kernel and the stack (memory
    held by others): such a choice is kept for this process only. A failure that depends on
    the kernel (a compile error, too much shared memory, a wrong result) is remembered with
    the choice: fixing the kernel changes the stack (the _C stamp, the sources hash), which
    measures again."""
    return any(isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
               for exc in errors.values())


def cached(key, offered=None):
    """The choice made earlier for key (this process, or on disk for this GPU model and
    stack), or None. offered: the candidates the caller can run; a remembered choice is then
    returned as the offered candidate it names (None if it names none of them)."""
    if key in _cache and (offered is None or _cache[key] in offered):
        return _cache[key]
    remembered = _remembered(key)
    if remembered is None:
        return None
    if offered is not None:
        remembered = {label(c): c for c in offered}.get(remembered)
        if remembered is None:
            return None
    _cache[key] = remembered  # the next call is one dict lookup
    return remembered


def choices() -> dict:
    """Every choice known: the disk cache's for this stack ("<device>|<key>": choice, earlier
    processes too) and this process's ("<key>": choice)."""
    known = {}
    if cache_path():
        current = stack()
        known = {k: e["choice"] for k, e in _load_disk().items() if e["stack"] == current}
    known.update({repr(key): label(choice) for key, choice in _cache.items()})
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


def measured_on(device: torch.device) -> bool:
    """Whether choices are measured on this device: CUDA devices only (on a CPU the ops take
    oneDNN's fused conv where it can run, else the library conv, by rule)."""
    return device.type == "cuda"


def can_measure() -> bool:
    """False while a CUDA graph is being captured: timing would break the capture."""
    if _enumerating:
        return True
    return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()
