"""Weighted sum of several rewards; every component is logged under its own name."""

from __future__ import annotations

import torch

from rewards.base import Reward, RewardOutput, build_reward


class WeightedMix(Reward):
    name = "mix"

    def __init__(self, weights: dict[str, float]):
        if not weights:
            raise ValueError("a reward mix needs at least one {name: weight} entry")
        self.weights = weights
        self.parts = {name: build_reward(name) for name in weights}

    def __call__(self, images, prompts, metadata):
        total = torch.zeros(len(images))
        info = {}
        for name, reward in self.parts.items():
            out = reward(images, prompts, metadata)
            info[name] = out.scores
            total = total + self.weights[name] * out.scores
        return RewardOutput(total, info)
