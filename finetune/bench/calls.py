"""The model-math floor: every network call of a run, counted and replayed alone.

A forward pre-hook on each network (denoiser, VAE decoder, text encoders) counts its calls by
(phase, network, input shapes, whether it is backpropagated) and keeps one copy of each kind's
inputs. Replaying each kind with nothing around it (no sampler, scheduler, reward or optimizer)
and multiplying by its count gives the seconds the run's model math alone takes; a phase's time
divided by its floor is what the framework adds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.utils._pytree import tree_flatten, tree_map


def _signature(args, kwargs) -> tuple:
    leaves, _ = tree_flatten((args, kwargs))
    return tuple((tuple(x.shape), x.dtype) if torch.is_tensor(x) else type(x).__name__ for x in leaves)


def _detached(tree):
    return tree_map(lambda x: x.detach().clone() if torch.is_tensor(x) else x, tree)


def _first_tensor(output) -> torch.Tensor:
    return next(x for x in tree_flatten(output)[0] if torch.is_tensor(x))


def seconds(fn: Callable[[], None], repeats: int, synchronize: bool) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    def timed() -> float:
        if synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if synchronize:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(repeats))


class CallRecorder:
    """Counts the calls of ``networks`` ({name: module}) per ``phase()`` while attached."""

    def __init__(self, networks: dict[str, torch.nn.Module], phase: Callable[[], str | None]):
        self.phase = phase
        self.calls: dict[tuple, list] = {}  # (phase, name, signature, backprop) -> [count, module, args, kwargs]
        self.handles = [m.register_forward_pre_hook(partial(self._record, name), with_kwargs=True)
                        for name, m in networks.items()]

    def _record(self, name, module, args, kwargs):
        backprop = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        key = (self.phase(), name, _signature(args, kwargs), backprop)
        if key not in self.calls:
            self.calls[key] = [0, module, _detached(args), _detached(kwargs)]
        self.calls[key][0] += 1

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def floor(self, repeats: int = 3, context=None) -> dict[str, float]:
        """{phase: seconds of its calls replayed alone}; ``context()`` wraps each replay (autocast)."""
        self.detach()
        synchronize = any(next(m.parameters()).device.type == "cuda" for _, m, _, _ in self.calls.values())
        out: dict[str, float] = {}
        for (phase, _, _, backprop), (count, module, args, kwargs) in self.calls.items():
            alone = seconds(partial(_replay, module, args, kwargs, backprop, context), repeats, synchronize)
            out[phase] = out.get(phase, 0.0) + count * alone
        return out


def _replay(module, args, kwargs, backprop: bool, context) -> None:
    with torch.set_grad_enabled(backprop), (context() if context else contextlib.nullcontext()):
        output = module(*args, **kwargs)
        if backprop:
            _first_tensor(output).float().sum().backward()
    if backprop:
        module.zero_grad(set_to_none=True)
