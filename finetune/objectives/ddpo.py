"""DDPO (Black et al., 2023) and its flow form, Flow-GRPO (Liu et al., 2025).

Denoising is an MDP whose actions are the sampler's steps x_t -> x_{t-1} with Gaussian policy
p_theta(x_{t-1} | x_t, c). With advantages A from per-prompt normalised rewards and the log-probs
recorded at sampling time (theta_old), the PPO-clipped surrogate over timesteps is

    r_t(theta) = p_theta(x_{t-1} | x_t, c) / p_theta_old(x_{t-1} | x_t, c)
    L_clip     = E_t[ max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)) ]

DDPO applies it to DDIM steps with eta > 0 on UNet (eps / v) models. Flow-GRPO applies it to the SDE
steps of a rectified-flow model and adds a KL to the reference policy, which for two Gaussians with
the same std is

    D_KL = || mu_theta - mu_ref ||^2 / (2 sigma_t^2)    (averaged over latent dims)
    L    = L_clip + beta * D_KL

As in the Flow-GRPO reference code, sigma_t here is the SDE's diffusion coefficient
a * sqrt(sigma / (1 - sigma)), not the step's std sigma_t * sqrt(|dt|): the KL is scaled by 1/|dt|.
"""

from __future__ import annotations

import torch

from finetune.advantages import clip_advantages
from finetune.objectives.base import Objective, clipped_surrogate


class DDPO(Objective):
    paper = "Black et al. 2023, DDPO"
    needs = ("trajectory",)

    def __init__(self, clip_range: float = 1e-4, adv_clip_max: float = 5.0, kl_beta: float = 0.0):
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.kl_beta = kl_beta

    def predict(self, policy, batch: dict) -> torch.Tensor:
        """The policy's output on the batch's x_t (G²RPO computes it once per shared x_k)."""
        return policy.predict(batch["x_t"], batch["t"], batch["cond"])

    def loss(self, policy, batch: dict) -> tuple[torch.Tensor, dict]:
        """``batch``: x_t, x_prev, t, old_log_prob, advantages (all batch-first) and cond."""
        x_t, t = batch["x_t"], batch["t"]
        step = policy.step(self.predict(policy, batch), t, x_t, prev_sample=batch["x_prev"])
        A = clip_advantages(batch["advantages"], self.adv_clip_max)
        ratio = torch.exp(step.log_prob - batch["old_log_prob"])
        loss = clipped_surrogate(A, ratio, self.clip_range)
        info = {"policy_loss": loss.detach(), "clipfrac": ((ratio - 1).abs() > self.clip_range).float().mean(),
                "approx_kl": 0.5 * ((step.log_prob - batch["old_log_prob"]) ** 2).mean().detach()}
        if self.kl_beta > 0:
            with torch.no_grad(), policy.reference():
                ref = policy.step(self.predict(policy, batch), t, x_t, prev_sample=batch["x_prev"])
            dims = tuple(range(1, x_t.ndim))
            var = step.std_dev_t.reshape(-1).expand(len(x_t)) ** 2
            stochastic = var > 0  # CPS's last step is deterministic: no KL there, and no 0/0 in the gradient
            kl = ((step.prev_sample_mean - ref.prev_sample_mean) ** 2).mean(dim=dims) / (
                2 * torch.where(stochastic, var, torch.ones_like(var)))
            kl = torch.where(stochastic, kl, torch.zeros_like(kl))
            loss = loss + self.kl_beta * kl.mean()
            info["kl"] = kl.mean().detach()
        return loss, info


class FlowGRPO(DDPO):
    """DDPO's surrogate on a flow model's SDE sampler, with the KL to the reference (beta).

    ``train.timestep_fraction`` keeps the *first* k = int(T * fraction) stochastic steps of every
    sample, in sampler order, as the reference code does (its 0.99 drops the last, least noisy step);
    DDPO draws a random subset per sample instead.
    """

    paper = "Liu et al. 2025, Flow-GRPO"
    families = ("flow",)

    def __init__(self, clip_range: float = 1e-4, adv_clip_max: float = 5.0, kl_beta: float = 0.04):
        super().__init__(clip_range, adv_clip_max, kl_beta)

    def train_steps(self, stochastic, k, generator):
        return torch.stack([torch.nonzero(row).flatten() for row in stochastic])[:, :k]
