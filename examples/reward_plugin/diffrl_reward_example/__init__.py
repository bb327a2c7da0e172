"""An example reward plugin for diffrl: mean red minus the mean of green and blue, in [-1, 1].

Install with ``pip install -e examples/reward_plugin`` and train with ``reward=redness``.
"""

from __future__ import annotations

from rewards.base import Reward, RewardOutput


class Redness(Reward):
    name = "redness"  # used in diffrl's logs and error messages

    def __init__(self, weight_green: float = 0.5):
        self.weight_green = weight_green

    def __call__(self, images, prompts, metadata):
        r, g, b = images.float().mean(dim=(2, 3)).cpu().unbind(dim=1)
        return RewardOutput(r - self.weight_green * g - (1 - self.weight_green) * b, {"red": r})
