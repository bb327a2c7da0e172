"""LOOP: leave-one-out PPO (Gupta et al., 2025, "A Simple and Effective Reinforcement Learning Method
for Text-to-Image Diffusion Fine-tuning", arXiv 2503.00897).

REINFORCE with K samples per prompt and the leave-one-out baseline (RLOO) has low variance but uses
each sample once; PPO reuses samples through importance ratios and clipping. LOOP combines them:
K trajectories x^(1..K) of prompt c, rewards R_i = R(x_0^(i), c), and

    A_i  = R_i - 1/(K-1) sum_{j != i} R_j
    r_t^(i)(theta) = p_theta(x_{t-1}^(i) | x_t^(i), c) / p_theta_old(x_{t-1}^(i) | x_t^(i), c)
    L    = E_{i,t}[ max(-A_i r_t^(i), -A_i clip(r_t^(i), 1 - eps, 1 + eps)) ]

The baseline of sample i excludes sample i, so it is independent of that sample's action and the
estimator stays unbiased, unlike a group mean that includes it (which shrinks A by (K-1)/K).

Choices the paper's public material leaves to the implementer (no official code is published):

* the advantage is the raw leave-one-out difference, not divided by a standard deviation
  (``std_normalize: true`` divides by the batch's reward std, for reward scales far from 1);
* the PPO part is DDPO's: per-step ratios over the recorded DDIM (or flow SDE) steps, clip range
  1e-4, advantages clipped to +-5, no KL term (the loss is ``DDPO.loss``);
* a group is one prompt pick with its ``sample.group_size`` = K samples; the same prompt picked
  twice in an epoch makes two independent groups.
"""

from __future__ import annotations

import torch

from finetune.advantages import leave_one_out
from finetune.objectives.ddpo import DDPO


class LOOP(DDPO):
    paper = "Gupta et al. 2025, LOOP"

    def __init__(self, clip_range: float = 1e-4, adv_clip_max: float = 5.0, kl_beta: float = 0.0,
                 std_normalize: bool = False):
        super().__init__(clip_range, adv_clip_max, kl_beta)
        self.std_normalize = std_normalize

    def check_batching(self, cfg) -> None:
        if cfg.sample.group_size < 2:
            raise ValueError("objective loop needs sample.group_size >= 2 (K samples per prompt): a sample's "
                             "baseline is the mean of the other K - 1")
        super().check_batching(cfg)

    def advantages(self, ctx, prompts, rewards):
        A = leave_one_out(rewards.double(), ctx.cfg.sample.group_size)
        if self.std_normalize:
            A = A / (rewards.double().std() + 1e-4)
        return A.float()
