"""Diffusion-DRO (Diffusion Denoising Ranking Optimization, 2025; official code basiclab/DiffusionDRO).

Preference learning as ranking, from inverse RL and without a reward model: an expert image should be
denoised better than the policy's own sample of the same prompt, measured relative to the frozen
reference model. For a prompt c, a training time t, an expert latent x0 with fresh noise eps and
its noised state xbar_t = noised(x0, eps, t), and a state x_t of the policy's own sampling
trajectory at the same t, whose target is the lagging policy theta's prediction eps_theta(x_t, c):

    L_exp(phi) = || eps_phi(xbar_t, t, c) - eps ||^2         L_pol(phi) = || eps_phi(x_t, t, c) - eps_theta(x_t, t, c) ||^2
    d          = [L_exp(phi) - L_exp(ref)] - [L_pol(phi) - L_pol(ref)]
    L          = mean max(0, m + d)                           (hinge, margin m = 0.001)

Squared errors are averaged over the latent's elements, with no time weighting. The hinge pushes the
expert error below the reference's and lets the policy's own error grow, until the expert leads by
the margin; past it (m + d < 0) the pair gives no gradient.

As in the official code:
* the policy states come from the lagging copy theta's deterministic, CFG-free trajectories (its
  ``buffer_guidance_scale`` 1), one uniformly drawn step of each trajectory per sample, on the same
  prompt as the expert example; the expert example's time is that step's time;
* theta is synced to phi every 16 micro-batches of 4, which with its 16 accumulation steps is once per
  optimizer step. Here theta is phi at the start of each epoch: an epoch of ``batch_size x
  gradient_accumulation_steps`` samples reproduces the official interval (the recipes do), more
  samples per epoch let theta lag for several optimizer steps;
* the prompt is dropped to "" with probability 0.2, and phi and the reference see both states in one concatenated batch.

Departures, each forced by this framework's samplers: the trajectories use the model's own sampler
(DDIM eta 0 / Euler ODE, ``model.num_steps``) instead of DPM-Solver++ with 20 steps, and their
times stay on that grid (the official code shifts each trajectory's grid by a random offset, so that
its times cover all 1000 DDPM steps). For flow models, where the official code has no version, the
same loss is applied to velocities (target eps - x0 for the expert, v_theta for the policy): this
framework's extension.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from finetune import distributed
from finetune.batches import minibatch_indices
from finetune.collect import BATCHES, SAMPLING, EpochContext
from finetune.models.base import select
from finetune.objectives.sft import DemonstrationObjective
from finetune.rollout import Rollout


def dro_hinge(expert: torch.Tensor, expert_ref: torch.Tensor, policy: torch.Tensor, policy_ref: torch.Tensor,
              margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mean max(0, m + d) and the per-pair d = (L_exp - L_exp_ref) - (L_pol - L_pol_ref)."""
    d = (expert - expert_ref) - (policy - policy_ref)
    return torch.clamp(d + margin, min=0).mean(), d


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample || output - target ||^2, averaged over the latent's elements."""
    return ((output.float() - target.float()) ** 2).mean(dim=tuple(range(1, output.ndim)))


class DRO(DemonstrationObjective):
    paper = "Diffusion-DRO 2025"
    needs_reference = True

    def __init__(self, margin: float = 0.001, prompt_dropout: float = 0.2):
        super().__init__(prompt_dropout)
        if margin < 0:
            raise ValueError(f"objective.margin must be >= 0 (the hinge's margin; official 0.001), got {margin}")
        self.margin = margin

    @torch.no_grad()
    def collect(self, ctx: EpochContext, records: list[dict]) -> Rollout:
        """Expert demonstrations, and for each the lagging policy's state and prediction at one random step."""
        rollout = self.demonstrations(ctx, len(records))
        policy, gen, n = ctx.policy, ctx.generator(SAMPLING), len(records)
        timesteps, levels = policy.timesteps(), policy.time_grid()
        step = torch.randint(len(timesteps), (n,), generator=gen)
        x = ctx.noise(n, gen)
        x_t, target = torch.empty_like(x), torch.empty_like(x)
        for i, t in enumerate(timesteps[:int(step.max()) + 1]):
            with distributed.autocast(ctx.accelerator):
                output = policy.forward(x, t, rollout.cond, guidance=False)
            here = (step == i).to(x.device)
            x_t[here], target[here] = x[here], output[here].to(x.dtype)
            x = policy.step(output, t, x, noise=0.0).prev_sample.to(x.dtype)
        rollout.extras = {"x_t": x_t, "target": target, "t": levels[step].to(x.device)}
        return rollout

    def batches(self, ctx: EpochContext, rollout: Rollout, advantages: torch.Tensor):
        """Minibatches of (expert, policy) pairs, each expert example noised afresh at its pair's time."""
        gen = ctx.generator(BATCHES)
        distributed.set_accumulation(ctx.accelerator, ctx.cfg.train.gradient_accumulation_steps)
        for idx in minibatch_indices(ctx, len(rollout), gen):
            x0 = rollout.final[idx]
            yield {"x0": x0, "eps": randn_tensor(x0.shape, generator=gen, device=x0.device),
                   "cond": select(rollout.cond, idx), **{k: v[idx] for k, v in rollout.extras.items()}}

    def loss(self, policy, batch: dict) -> tuple[torch.Tensor, dict]:
        """``batch``: x0, eps, t (the pair's noise level), x_t and target (the policy's state and theta's output), cond."""
        x0, eps, t = batch["x0"], batch["eps"], batch["t"]
        x = torch.cat([policy.noised(x0, eps, t), batch["x_t"]])
        target = torch.cat([policy.target(x0, eps, t), batch["target"]])
        time, cond = torch.cat([t, t]), {k: torch.cat([v, v]) for k, v in batch["cond"].items()}
        with torch.no_grad(), policy.reference():
            expert_ref, policy_ref = squared_error(self.predict(policy, x, time, cond), target).chunk(2)
        expert, own = squared_error(self.predict(policy, x, time, cond), target).chunk(2)
        loss, d = dro_hinge(expert, expert_ref, own, policy_ref, self.margin)
        return loss, {"hinge": loss.detach(), "d": d.mean().detach(), "expert_error": expert.mean().detach(),
                      "policy_error": own.mean().detach(), "expert_gain": (expert_ref - expert).mean().detach(),
                      "active_pairs": (d + self.margin > 0).float().mean()}
