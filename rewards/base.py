"""The reward protocol and registry.

A reward maps a batch of images (float tensor ``(B, 3, H, W)`` in [0, 1]) plus their prompts and
per-prompt metadata to ``RewardOutput(scores, info)``: one float per image and a dict of extra
per-image tensors for logging. Rewards register under a name; ``build_reward`` accepts a name, a
``{name: weight}`` mix, or ``{"name": ..., **kwargs}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


@dataclass
class RewardOutput:
    scores: torch.Tensor  # (B,) float32
    info: dict[str, torch.Tensor] = field(default_factory=dict)


class Reward:
    name: str = "reward"
    # True: called with gradients enabled, ``scores`` keep their graph back to ``images``, so an
    # objective can backpropagate through the reward (CTRL). Other rewards' scores are constants.
    differentiable: bool = False
    needs: str = ""  # what it needs beyond diffrl (weights, packages, a server), for `diffrl rewards list`

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        raise NotImplementedError


REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    def wrap(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def _builtins() -> None:
    # Importing the modules registers their rewards.
    from rewards import (aesthetic, clipscore, geneval, hps, imagereward, jpeg, ocr, pickscore, remote,  # noqa: F401
                         simple, size)


def build_reward(spec) -> Reward:
    """A reward from a name, ``{"name": n, **kwargs}``, or a ``{name: weight, ...}`` mix.

    A name is a built-in, a ``module:attr`` reference, or an installed ``diffrl.rewards`` entry point.
    """
    _builtins()
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    if "name" not in spec:
        from rewards.mix import WeightedMix

        return WeightedMix({n: float(w) for n, w in spec.items()})
    name = spec.pop("name")
    factory = REGISTRY.get(name)
    if factory is None:
        # Not built in: a `module:attr` reference or the one entry point of that name (rewards/plugins.py).
        from rewards.plugins import entry_point_names, resolve

        factory = resolve(name)
        if factory is None:
            available = sorted(set(REGISTRY) | set(entry_point_names()))
            raise ValueError(f"unknown reward {name!r} (config field `reward`); available: {', '.join(available)}")
    from finetune.config import check_options

    check_options("reward", name, factory, spec)
    return factory(**spec)


def check_finite(scores: torch.Tensor, name: str) -> torch.Tensor:
    bad = ~torch.isfinite(scores)
    if bad.any():
        raise FloatingPointError(
            f"reward {name!r} returned {int(bad.sum())} non-finite score(s) (NaN/inf) out of {len(scores)}; "
            "fix the reward or wrap it so that it returns finite floats")
    return scores
