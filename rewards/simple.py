"""Toy rewards for smoke tests and debugging: cheap, differentiable-free, obviously learnable."""

from __future__ import annotations

from rewards.base import Reward, RewardOutput, register


@register("brightness")
class Brightness(Reward):
    """Mean pixel value in [0, 1]."""

    def __call__(self, images, prompts, metadata):
        return RewardOutput(images.float().mean(dim=(1, 2, 3)).cpu())
