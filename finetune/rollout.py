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
    images: torch.Tensor | None  # decoded, (B, 3, H, W) in [0, 1]; the trainer drops them once scored
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt embeddings, reused in training
    timesteps: torch.Tensor | None = None  # (T,) the sampler's timesteps
    latents: torch.Tensor | None = None  # (B, T+1, C, H, W): x_T ... x_0 when a trajectory is recorded
    log_probs: torch.Tensor | None = None  # (B, T): log p(x_{t-1} | x_t) of each recorded step
    stochastic_steps: torch.Tensor | None = None  # (B, T) bool: which steps sampled from the policy's noise
    rewards: torch.Tensor | None = None  # (B,), or (B, M) when an objective scores M completions per sample
    reward_info: dict[str, torch.Tensor] = field(default_factory=dict)  # the reward's per-sample extras
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample tensors an objective's collect adds

    def __len__(self) -> int:
        return len(self.prompts)


@torch.no_grad()
def sample(policy: Policy, prompts: list[str], noise: torch.Tensor, metadata: list[dict] | None = None,
           trajectory: bool = False, stochastic: bool = True, generator: torch.Generator | None = None,
           window: tuple[int, int] | None = None, decode: bool = True) -> Rollout:
    """Run the sampler from ``noise``; record the per-step trajectory and log-probs if asked.

    ``stochastic=False`` uses the deterministic sampler (DDIM eta=0 / Euler ODE). ``window=(start,
    end)`` makes only steps ``start <= i < end`` stochastic and the rest deterministic (Flow-GRPO-Fast):
    the policy gradient then comes from the steps that decide the composition, without the noise
    that the other steps' log-probs add to it. ``decode=False`` skips the VAE (no ``images``).
    """
    cond = policy.embed(prompts)
    timesteps = policy.timesteps()
    start, end = window if window is not None else (0, len(timesteps))
    random_steps = torch.zeros(len(timesteps), dtype=torch.bool)
    random_steps[start:end] = stochastic
    x = noise
    path, log_probs = [x], []
    for i, t in enumerate(timesteps):
        step = policy.step(policy.predict(x, t, cond), t, x, generator=generator,
                           noise=None if random_steps[i] else 0.0)
        x = step.prev_sample.to(noise.dtype)
        if trajectory:
            path.append(x)
            log_probs.append(step.log_prob)
    return Rollout(
        prompts=list(prompts), metadata=list(metadata or [{} for _ in prompts]), noise=noise, final=x,
        images=policy.latents_to_images(x) if decode else None, cond=cond,
        timesteps=timesteps if trajectory else None,
        latents=torch.stack(path, 1) if trajectory else None,
        log_probs=torch.stack(log_probs, 1) if trajectory else None,
        stochastic_steps=random_steps.expand(len(prompts), -1).clone() if trajectory else None,
    )


def concat(parts: list[Rollout]) -> Rollout:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Rollout(
        prompts=[x for p in parts for x in p.prompts], metadata=[x for p in parts for x in p.metadata],
        noise=cat("noise"), final=cat("final"), images=cat("images"),
        cond={k: torch.cat([p.cond[k] for p in parts]) for k in parts[0].cond},
        timesteps=parts[0].timesteps, latents=cat("latents"), log_probs=cat("log_probs"),
        stochastic_steps=cat("stochastic_steps"), rewards=cat("rewards"),
        reward_info={k: torch.cat([p.reward_info[k] for p in parts]) for k in parts[0].reward_info},
        extras={k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras},
    )
