"""DiffusionNFT (Zheng et al., 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process").

Reinforcement on the forward process: rollouts only need their clean samples x0, drawn with the
deterministic sampler (no CFG) from the *old* policy v_old. Rewards become per-prompt advantages A,
clipped to A_max and mapped to an optimality probability

    r = clamp(A / (2 A_max) + 1/2, 0, 1).

At training times t with fresh noise eps, x_t = (1 - t) x0 + t eps and, with the current v_theta,

    v+ = beta v_theta + (1 - beta) v_old          (implicit positive policy)
    v- = (1 + beta) v_old - beta v_theta          (implicit negative policy)
    x0+ = x_t - t v+,   x0- = x_t - t v-
    l+- = || x0+- - x0 ||^2 / sg(mean |x0+- - x0|)   (adaptive weight, clamped >= 1e-5)
    L   = A_max * mean[ (r l+ + (1 - r) l-) / beta ]  +  beta_KL * || v_theta - v_ref ||^2

so high-reward samples pull v_theta towards x0 and low-reward ones push it away, guided by
v_old. With D = t beta (v_theta - v_old) and e = x_t - t v_old - x0 (equal adaptive weights w),
r l+ + (1 - r) l- = (|e|^2 + |D|^2 - 2 (2r - 1) e.D) / w: advantage-weighted flow matching
plus a proximal term that pulls v_theta back to v_old, which is why several optimizer steps per
epoch stay stable here while AWM, lacking it, drifts (docs/objectives.md).

After each epoch the old policy follows theta softly:

    theta_old <- d theta_old + (1 - d) theta,   d = min(uprate * max(step - flat, 0), cap)  (0 before flat)

Velocities are the policy's own prediction: conditional only at guidance 1, the paper's and the
official code's CFG-free setting. With guidance > 1 rollouts and velocities are classifier-free
guided: this framework's extension, not in the official code (which trains CFG-free only).
For UNet models the same loss holds with x0+- the clean samples implied by the mixed eps (or v)
predictions (x0 is linear in the model output), which ``policy.predict_x0`` gives.
"""

from __future__ import annotations

import torch

from finetune.advantages import clip_advantages
from finetune.objectives.base import Objective, WeightCopy, permuted_grid_times, reference_distance

# The official decay schedules: (flat, uprate, cap).
DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_policy_decay(step: int, decay_type: int) -> float:
    flat, uprate, cap = DECAY_TYPES[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, cap)


def adaptive_l2(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error divided by its own detached mean absolute error."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).to(x0.dtype)
    return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)


class DiffusionNFT(Objective):
    paper = "Zheng et al. 2025, DiffusionNFT"
    needs = ("final",)
    deterministic_rollouts = True

    def __init__(self, beta: float = 1.0, adv_clip_max: float = 5.0, kl_beta: float = 1e-4,
                 decay_type: int = 1, timestep_fraction: float = 0.99):
        if beta <= 0:
            raise ValueError(f"objective.beta must be > 0 (the NFT guidance strength), got {beta}")
        if decay_type not in DECAY_TYPES:
            raise ValueError(f"objective.decay_type must be one of {sorted(DECAY_TYPES)}, got {decay_type}")
        self.beta = beta
        self.adv_clip_max = adv_clip_max
        self.kl_beta = kl_beta
        self.decay_type = decay_type
        self.timestep_fraction = timestep_fraction
        self.old: WeightCopy | None = None

    def setup(self, policy, params):
        self.old = WeightCopy(params)

    def rollout_context(self, policy):
        return self.old.swapped_in()

    def training_times(self, policy, n: int, generator: torch.Generator) -> torch.Tensor:
        grid = policy.time_grid().cpu()
        k = max(1, int(len(grid) * self.timestep_fraction))
        return permuted_grid_times(grid, n, k, generator)

    def end_epoch(self, global_step: int) -> None:
        self.old.soft_update(old_policy_decay(global_step, self.decay_type))

    def state_dict(self):
        return self.old.state_dict("old/")

    def load_state_dict(self, state):
        self.old.load_state_dict(state, "old/")

    def optimality(self, advantages: torch.Tensor) -> torch.Tensor:
        A = clip_advantages(advantages, self.adv_clip_max)
        return (A / (2 * self.adv_clip_max) + 0.5).clamp(0, 1)

    def loss(self, policy, batch: dict) -> tuple[torch.Tensor, dict]:
        """``batch``: x0, eps, t (noise levels), advantages, cond."""
        x0, t, cond = batch["x0"], batch["t"], batch["cond"]
        x_t = policy.noised(x0, batch["eps"], t)
        time = policy.model_time(t)
        # The old policy first: swapping weights in place must not touch a graph already built.
        with torch.no_grad(), self.old.swapped_in():
            v_old = policy.predict(x_t, time, cond)
        v_theta = policy.predict(x_t, time, cond)
        v_pos = self.beta * v_theta + (1 - self.beta) * v_old
        v_neg = (1 + self.beta) * v_old - self.beta * v_theta
        loss_pos = adaptive_l2(policy.predict_x0(x_t, v_pos, t), x0)
        loss_neg = adaptive_l2(policy.predict_x0(x_t, v_neg, t), x0)
        r = self.optimality(batch["advantages"])
        policy_loss = (self.adv_clip_max * (r * loss_pos + (1 - r) * loss_neg) / self.beta).mean()
        info = {"policy_loss": policy_loss.detach(), "loss_pos": loss_pos.mean().detach(),
                "loss_neg": loss_neg.mean().detach()}
        loss = policy_loss
        if self.kl_beta > 0:
            kl = reference_distance(policy, x_t, time, cond, v_theta)
            loss = loss + self.kl_beta * kl
            info["kl"] = kl.detach()
        return loss, info
