"""One progress display for the long commands (bench, tune, demo): a tqdm bar when tqdm is
installed, else one plain line per step, so the commands run (less pretty) without it."""

import sys


class Progress:
    def __init__(self, total: int, unit: str = "step"):
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, unit=unit, dynamic_ncols=True)
        self._done, self._total = 0, total

    def describe(self, text: str) -> None:
        """What runs now: the bar's label, or a plain line."""
        if self._bar is not None:
            self._bar.set_description(text)
        else:
            print(f"[{self._done}/{self._total}] {text}", flush=True)

    def step(self, count: int = 1) -> None:
        self._done += count
        if self._bar is not None:
            self._bar.update(count)

    def write(self, line: str) -> None:
        """A message on stderr that does not break the bar (printed above it)."""
        if self._bar is None:
            print(line, file=sys.stderr, flush=True)
        else:
            self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
