"""AWM, Advantage Weighted Matching (Xue et al., 2025, "Advantage Weighted Matching: Aligning RL
with Pretraining in Diffusion Models").

Rollouts come from the stochastic sampler, but their per-step log-probs are not used. Each clean
sample x0 is re-noised at a few training times t (stratified over the sampler's grid, or uniform
and shifted t -> s t / (1 + (s - 1) t)) with fresh eps, x_t = (1 - t) x0 + t eps, and the
pretraining loss stands in for the log-likelihood:

    log p_theta(x0 | t, eps) ~= -w(t, || v_theta(x_t, t) - (eps - x0) ||^2)

with w the time weighting ("uniform": the mse itself; "ghuber" (the official default):
((mse + 1e-10)^p - 1e-10^p) t / p). With A = clip(A, +-A_max) / A_max * advantage_max,

    ratio = exp(log p_theta - log p_old)
    L     = mean[ max(-A ratio, -A clip(ratio, 1 - eps_clip, 1 + eps_clip)) ]
            + beta || v_theta - v_ref ||^2 + ema_beta || v_theta - v_ema ||^2

where p_old is the rollout policy and v_ref the base model. v_ema is the official code's adaptive
proximal target, a soft copy of theta updated after every epoch,

    theta_ema <- d theta_ema + (1 - d) theta,   d = min(kl_ema_decay, 0.001 * step)   ("linear")

so it starts as the policy itself (d = 0) and lags more as training goes on (d -> 0.3 after 300
optimizer steps). Both distances are uniform means over latent dims, training times and samples.
Within an epoch it pulls v_theta back towards where the epoch started, the same kind of proximal
term DiffusionNFT's loss holds (its |D|^2, nft.py); with one optimizer step per epoch (the official
setting) and d = 0 it is zero at that step. The official code adds it only when beta > 0; here it
applies whenever ema_beta > 0.

``negative_weight`` (not in the paper; default 1) scales the negative advantages: at 0 only the
better-than-average samples are matched (reward-weighted regression), a diagnostic (docs/objectives.md).
On the first step after sampling the ratio is 1 and the policy gradient is -A grad log p_theta:
advantage-weighted flow matching, pretraining's loss reweighted.
As in the official code, v_theta is guided when the model's guidance scale is > 1.
For UNet models the target is the scheduler's, eps or v, instead of the velocity (``policy.target``).
"""

from __future__ import annotations

import torch

from finetune.advantages import clip_advantages
from finetune.objectives.base import (Objective, WeightCopy, clipped_surrogate, reference_distance,
                                      stratified_grid_times, uniform_times)

TIME_TYPES = ("discrete", "discrete_wo_init", "uniform")


def weighted_log_prob(mse: torch.Tensor, t: torch.Tensor, weighting: str, power: float = 0.25) -> torch.Tensor:
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * t
    if weighting == "ghuber":
        return -((mse + 1e-10) ** power - 1e-10**power) * t / power
    raise ValueError(f"objective.weighting must be uniform, t or ghuber, got {weighting!r}")


class AWM(Objective):
    paper = "Xue et al. 2025, AWM"
    needs = ("final",)

    def __init__(self, clip_range: float = 1.0, adv_clip_max: float = 5.0, advantage_max: float = 1.0,
                 kl_beta: float = 1e-3, train_timesteps: int = 6, time_type: str = "discrete_wo_init",
                 timestep_fraction: float = 0.9, time_shift: float = 3.0, weighting: str = "ghuber",
                 ghuber_power: float = 0.25, negative_weight: float = 1.0, ema_beta: float = 1.0,
                 kl_ema_decay: float = 0.3, kl_ema_decay_type: str = "linear"):
        if time_type not in TIME_TYPES:
            raise ValueError(f"objective.time_type must be one of {', '.join(TIME_TYPES)}, got {time_type!r}")
        weighted_log_prob(torch.zeros(1), torch.ones(1), weighting)  # validate the name now
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.advantage_max = advantage_max
        self.kl_beta = kl_beta
        self.train_timesteps = train_timesteps
        self.time_type = time_type
        self.timestep_fraction = timestep_fraction
        self.time_shift = time_shift
        self.weighting = weighting
        self.ghuber_power = ghuber_power
        if negative_weight < 0:
            raise ValueError(f"objective.negative_weight must be >= 0, got {negative_weight}")
        self.negative_weight = negative_weight
        if kl_ema_decay_type not in ("linear", "constant"):
            raise ValueError(f"objective.kl_ema_decay_type must be linear or constant, got {kl_ema_decay_type!r}")
        self.ema_beta = ema_beta
        self.kl_ema_decay = kl_ema_decay
        self.kl_ema_decay_type = kl_ema_decay_type
        self.old: WeightCopy | None = None  # the rollout policy, for the ratio
        self.ema: WeightCopy | None = None  # the proximal target v_ema
        self.on_policy = True

    def setup(self, policy, params):
        self.old = WeightCopy(params)
        self.ema = WeightCopy(params)

    def ema_decay(self, global_step: int) -> float:
        if self.kl_ema_decay_type == "constant":
            return self.kl_ema_decay
        return min(self.kl_ema_decay, 0.001 * global_step)

    def end_epoch(self, global_step: int) -> None:
        self.ema.soft_update(self.ema_decay(global_step))

    def state_dict(self):
        return self.ema.state_dict("ema/")

    def load_state_dict(self, state):
        if state:  # checkpoints written before the proximal term existed have none
            self.ema.load_state_dict(state, "ema/")

    def start_epoch(self) -> None:
        self.old.soft_update(0.0)  # the policy that drew this epoch's rollouts
        self.on_policy = True

    def after_step(self, global_step: int) -> None:
        self.on_policy = False

    def training_times(self, policy, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.time_type == "uniform":
            return uniform_times(n, self.train_timesteps, generator, self.time_shift, low=0.2)
        return stratified_grid_times(policy.time_grid().cpu(), n, self.train_timesteps, generator,
                                     skip_first=self.time_type == "discrete_wo_init",
                                     fraction=self.timestep_fraction)

    def log_prob(self, policy, output, x0, eps, t) -> torch.Tensor:
        dims = tuple(range(1, x0.ndim))
        mse = ((output.double() - policy.target(x0, eps, t).double()) ** 2).mean(dim=dims)
        return weighted_log_prob(mse, t.double(), self.weighting, self.ghuber_power)

    def loss(self, policy, batch: dict) -> tuple[torch.Tensor, dict]:
        """``batch``: x0, eps, t (noise levels), advantages, cond."""
        x0, eps, t, cond = batch["x0"], batch["eps"], batch["t"], batch["cond"]
        x_t = policy.noised(x0, eps, t)
        time = policy.model_time(t)
        old_log_prob = v_ema = None
        # Other weights first: the swap writes the parameters in place, before the graph below exists.
        if not self.on_policy:
            with torch.no_grad(), self.old.swapped_in():
                old_log_prob = self.log_prob(policy, policy.predict(x_t, time, cond), x0, eps, t)
        if self.ema_beta > 0:
            with torch.no_grad(), self.ema.swapped_in():
                v_ema = policy.predict(x_t, time, cond)
        v_theta = policy.predict(x_t, time, cond)
        log_prob = self.log_prob(policy, v_theta, x0, eps, t)
        if old_log_prob is None:  # no step since sampling: the current weights are the rollout policy
            old_log_prob = log_prob.detach()
        A = clip_advantages(batch["advantages"], self.adv_clip_max) / self.adv_clip_max * self.advantage_max
        A = torch.where(A < 0, A * self.negative_weight, A)
        ratio = torch.exp(log_prob - old_log_prob)
        policy_loss = clipped_surrogate(A, ratio, self.clip_range).float()
        info = {"policy_loss": policy_loss.detach(), "log_prob": log_prob.mean().detach().float(),
                "clipfrac": ((ratio - 1).abs() > self.clip_range).float().mean()}
        loss = policy_loss
        if self.kl_beta > 0:
            kl = reference_distance(policy, x_t, time, cond, v_theta)
            loss = loss + self.kl_beta * kl
            info["kl"] = kl.detach()
        if v_ema is not None:
            proximal = ((v_theta.float() - v_ema.float()) ** 2).mean()
            loss = loss + self.ema_beta * proximal
            info["ema_kl"] = proximal.detach()
        return loss, info
