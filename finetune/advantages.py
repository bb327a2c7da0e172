"""Reward -> advantage, written once for every objective.

``PerPromptStatTracker`` is DDPO's per-prompt normaliser: each prompt keeps a buffer of its recent
rewards; once it holds ``min_count`` of them, A = (r - mean_prompt) / (std_prompt + eps), before
that the batch's global mean/std are used. With ``buffer_size=None`` and ``clear()`` after every
epoch it is GRPO's group normalisation (Flow-GRPO): each prompt's group of samples in this epoch is
its own baseline. ``global_std`` divides by the batch std instead of the group's.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    def __init__(self, buffer_size: int | None = None, min_count: int = 2, global_std: bool = False,
                 eps: float = 1e-4):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.global_std = global_std
        self.eps = eps
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        advantages = np.empty_like(rewards)
        batch_std = rewards.std() + self.eps
        for prompt in dict.fromkeys(prompts):
            mine = np.array([p == prompt for p in prompts])
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mine].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards.mean(), batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer) + self.eps
            advantages[mine] = (rewards[mine] - mean) / (batch_std if self.global_std else std)
        return advantages

    def clear(self) -> None:
        self.stats = {}

    def state_dict(self) -> dict:
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}


def clip_advantages(advantages, max_abs: float):
    """Clamp to [-max_abs, max_abs] (DDPO's ``adv_clip_max``)."""
    return advantages.clamp(-max_abs, max_abs) if hasattr(advantages, "clamp") else np.clip(advantages, -max_abs, max_abs)


def contiguous_groups(values, group_size: int, what: str = "rewards"):
    """(N, ...) -> (N / group_size, group_size, ...): the groups the rollouts were sampled in."""
    if group_size < 2 or len(values) % group_size:
        raise ValueError(f"{len(values)} {what} do not split into groups of sample.group_size={group_size} "
                         f"(it must be >= 2: a group is its own baseline)")
    return values.reshape(-1, group_size, *values.shape[1:])


def leave_one_out(rewards, group_size: int):
    """REINFORCE's leave-one-out baseline: A_i = r_i - mean_{j != i} r_j within each group (RLOO, LOOP)."""
    groups = contiguous_groups(rewards, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(rewards.shape)


def group_normalize(rewards, group_size: int, eps: float = 1e-8):
    """(r - mean_group) / (std_group + eps) within each group, per column of (N, M) rewards; the
    std is the unbiased one (torch.std), as the reference code of Granular-GRPO uses."""
    groups = contiguous_groups(rewards, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)).reshape(rewards.shape)
