"""Seconds spent per stage of a run (decode, gradient pass, compile, masked forwards, body mask, CRF, render, PNG
write), and the progress bar of the commands that score or show a finished run.

Stages that run in worker processes add up their own time, so the sum can exceed the wall-clock time: that overlap
is the point of the workers.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

STAGES = ("decode", "gradient pass", "compile", "masked forwards", "body mask", "crf", "render", "png write")


class StageTimes:
    def __init__(self, synchronize=None):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._synchronize = synchronize   # e.g. torch.cuda.synchronize, so GPU work is charged to its stage

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextlib.contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self._synchronize is not None:
                self._synchronize()
            self.add(stage, time.perf_counter() - started)

    def ordered(self) -> dict[str, float]:
        """Seconds per stage, in the order of the data flow."""
        names = [s for s in STAGES if s in self.seconds] + [s for s in self.seconds if s not in STAGES]
        return {name: self.seconds[name] for name in names}


def progress(items, what: str, unit: str = "map"):
    """`items` with a progress bar on stderr, gone when done: scoring or showing a large run's maps takes minutes."""
    return _bar(iterable=items, desc=what, unit=unit, leave=False)


@contextlib.contextmanager
def progress_bar(**options) -> Iterator[tqdm]:
    """A tqdm bar on stderr while the block runs. In a terminal the log's lines go above the bar, not into it."""
    with _bar(**options) as bar, (logging_redirect_tqdm() if sys.stderr.isatty() else contextlib.nullcontext()):
        yield bar


def _bar(**options) -> tqdm:
    """In a terminal, a bar that redraws in place; in a file (a Slurm job's log) each redraw is a line of its own, one
    a minute at most: tqdm's redraws, up to ten a second joined by carriage returns, made one line of about 100 bytes
    per film, which `grep` and `less` show as a wall of text."""
    if sys.stderr.isatty():
        return tqdm(dynamic_ncols=True, **options)
    return tqdm(file=_Lines(sys.stderr), mininterval=60, ascii=True, ncols=100, **options)


class _Lines:
    """A stream for tqdm that ends each redraw with a line break instead of starting it with a carriage return."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()
