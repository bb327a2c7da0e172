"""How a rollout becomes training minibatches: the two shapes the default objectives train on.

Each generator sets the accumulation (how many minibatches make one optimizer step) before it
yields, so that one step covers ``train.batch_size`` samples at all their training steps or times,
times ``train.gradient_accumulation_steps``.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from finetune import distributed
from finetune.collect import BATCHES, EpochContext
from finetune.models.base import select
from finetune.rollout import Rollout


def step_batch(rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: torch.Tensor) -> dict:
    """The recorded transition x_t -> x_prev of sampler step ``k[i]`` of each sample ``idx[i]``."""
    return {
        "x_t": rollout.latents[idx, k], "x_prev": rollout.latents[idx, k + 1],
        "t": rollout.timesteps[k], "old_log_prob": rollout.log_probs[idx, k],
        "advantages": advantages[idx], "cond": select(rollout.cond, idx),
    }


def sampler_step_batches(ctx: EpochContext, objective, rollout: Rollout, advantages: torch.Tensor):
    """(sample, recorded step) minibatches; which steps each sample trains is ``objective.train_steps``."""
    t_cfg = ctx.cfg.train
    n, T = rollout.log_probs.shape
    random_steps = rollout.stochastic_steps  # deterministic steps have no log-prob to train
    if t_cfg.get("timestep_range") is not None:
        lo, hi = t_cfg.timestep_range
        if not 0 <= lo < hi <= T:
            raise ValueError(f"train.timestep_range [{lo}, {hi}] must lie within the {T} sampler steps "
                             f"(model.num_steps) and hold at least one")
        in_range = torch.zeros(T, dtype=torch.bool)
        in_range[lo:hi] = True
        random_steps = random_steps & in_range.to(random_steps.device)
    counts = random_steps.sum(1)
    if counts.min() != counts.max() or counts.min() == 0:
        raise ValueError("every sample needs the same, non-zero number of stochastic steps to train on: "
                         "check sample.sde_window_size/range against train.timestep_range")
    n_train = max(1, int(int(counts[0]) * t_cfg.timestep_fraction))
    gen = ctx.generator(BATCHES)
    distributed.set_accumulation(ctx.accelerator, n_train * t_cfg.gradient_accumulation_steps)
    for _ in range(t_cfg.inner_epochs):
        order = torch.randperm(n, generator=gen)
        steps = objective.train_steps(random_steps, n_train, gen)  # (n, n_train) step indices
        for start in range(0, n, t_cfg.batch_size):
            idx = order[start:start + t_cfg.batch_size]
            for j in range(n_train):
                yield step_batch(rollout, advantages, idx, steps[idx, j])


def minibatch_indices(ctx: EpochContext, n: int, generator: torch.Generator):
    """Index tensors of ``train.batch_size`` samples out of n, reshuffled for each of ``train.inner_epochs``."""
    t_cfg = ctx.cfg.train
    for _ in range(t_cfg.inner_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, t_cfg.batch_size):
            yield order[start:start + t_cfg.batch_size]


def forward_process_batches(ctx: EpochContext, objective, rollout: Rollout, advantages: torch.Tensor):
    """(clean sample, training time, fresh noise) minibatches; the times are ``objective.training_times``."""
    t_cfg = ctx.cfg.train
    gen = ctx.generator(BATCHES)
    for idx in minibatch_indices(ctx, len(rollout), gen):
        times = objective.training_times(ctx.policy, len(idx), gen)  # (K, b)
        distributed.set_accumulation(ctx.accelerator, len(times) * t_cfg.gradient_accumulation_steps)
        x0 = rollout.final[idx]
        for t in times:
            yield {"x0": x0, "eps": randn_tensor(x0.shape, generator=gen, device=x0.device),
                   "t": t.to(x0.device), "advantages": advantages[idx], "cond": select(rollout.cond, idx)}
