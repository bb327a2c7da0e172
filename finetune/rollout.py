"""Sampling with a policy into a ``Rollout`` record that holds only what the objective needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finetune.models.base import Policy


@dataclass
class Rollout:
    prompts: list[str]
    metadata: list[dict]
    noise: torch.Tensor  # initial latents x_T, (B, C, H, W)
    final: torch.Tensor  # x_0 latents
    images: torch.Tensor  # decoded, (B, 3, H, W) in [0, 1]
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt embeddings, reused in training
    timesteps: torch.Tensor | None = None  # (T,) the sampler's timesteps
    latents: torch.Tensor | None = None  # (B, T+1, C, H, W): x_T ... x_0 when a trajectory is recorded
    log_probs: torch.Tensor | None = None  # (B, T): log p(x_{t-1} | x_t) of each recorded step

    def __len__(self) -> int:
        return len(self.prompts)


@torch.no_grad()
def sample(policy: Policy, prompts: list[str], noise: torch.Tensor, metadata: list[dict] | None = None,
           trajectory: bool = False, stochastic: bool = True, generator: torch.Generator | None = None) -> Rollout:
    """Run the sampler from ``noise``; record the per-step trajectory and log-probs if asked.

    ``stochastic=False`` uses the deterministic sampler (DDIM eta=0 / Euler ODE).
    """
    cond = policy.encode(prompts)
    timesteps = policy.timesteps()
    x = noise
    path, log_probs = [x], []
    for t in timesteps:
        step = policy.step(policy.predict(x, t, cond), t, x, generator=generator,
                           noise=None if stochastic else 0.0)
        x = step.prev_sample.to(noise.dtype)
        if trajectory:
            path.append(x)
            log_probs.append(step.log_prob)
    return Rollout(
        prompts=list(prompts), metadata=list(metadata or [{} for _ in prompts]), noise=noise, final=x,
        images=policy.latents_to_images(x), cond=cond,
        timesteps=timesteps if trajectory else None,
        latents=torch.stack(path, 1) if trajectory else None,
        log_probs=torch.stack(log_probs, 1) if trajectory else None,
    )
