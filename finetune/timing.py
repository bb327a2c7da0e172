"""Where an epoch's time goes: seconds per named phase (sample, reward, gather, optimize, evaluate, ...).

Phases nest; each phase's seconds exclude the phases inside it (the reward calls made while
sampling count as ``reward``, not ``sample``). On CUDA the device is synchronised at each boundary,
so asynchronous kernels are counted in the phase that launched them.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class Phases:
    def __init__(self, synchronize: bool = False):
        self.synchronize = synchronize
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []

    @property
    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = self._now()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            spent = self._now() - start
            self.seconds[name] += spent
            if self.stack:  # exclusive times: the enclosing phase does not count this one
                self.seconds[self.stack[-1]] -= spent

    def pop(self) -> dict[str, float]:
        """``{"time/<phase>": seconds}`` accumulated since the last pop, and reset."""
        out = {f"time/{name}": seconds for name, seconds in self.seconds.items()}
        self.seconds.clear()
        return out
