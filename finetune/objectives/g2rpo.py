"""Granular-GRPO (G²RPO, 2025, "G²RPO: Granular GRPO for Precise Reward in Flow Models", arXiv 2510.01982;
official code: bcmi/Granular-GRPO, fastvideo/train_g2rpo_hps.py).

Flow-GRPO makes every sampler step stochastic and credits the whole trajectory's reward to each
step. G²RPO attributes the reward to one step at a time.

Singular stochastic sampling. Each prompt gets one initial noise and a deterministic ODE "anchor"
trajectory x_T ... x_0 from it. For each branching step k in M (the first half of the steps), G
branches leave the anchor at x_k with one SDE step (Flow-GRPO's, noise level a),

    x_{k+1}^(i) ~ N(mu_theta(x_k), sigma_k^2 |dt_k| I),    i = 1..G,

and continue with the ODE. Branches share x_k exactly and differ only in that step's noise, so the
spread of their rewards is the effect of that one action; each (prompt, k) is its own group.

Multi-granularity advantage integration. After one full-resolution ODE step, each branch is
completed at several granularities lambda in Lambda: the ODE visits every lambda-th point of the
remaining sigma grid (a last jump to sigma = 0 when the stride misses it). Each granularity's
rewards are normalised within the group, and the advantages are summed:

    A^(i) = sum_{lambda in Lambda} (R_lambda^(i) - mean_G R_lambda) / (std_G R_lambda + 1e-8)

The loss is Flow-GRPO's clipped surrogate on the branching step only (``FlowGRPO.loss``; clip range
1e-4, advantages clipped to +-5, no KL, as the official scripts), with one optimizer step per
branching step k, as the official loop.

Defaults follow the official scripts: Lambda = {1, 2} (the paper's ablation also uses {1, 2, 3}),
branching steps 0 .. T/2 - 1 (its 0..7 of 16 steps), noise level 0.7 (``model.noise``), one
prediction at the shared x_k for all G branches. Departures: the group size is ``sample.group_size``
(official 12) and all groups of a process at one k form one optimizer step (official: one prompt
per GPU, 16 GPUs).
"""

from __future__ import annotations

import math

import torch

from finetune import distributed
from finetune.advantages import group_normalize
from finetune.collect import BATCHES, SAMPLING
from finetune.models.base import select
from finetune.objectives.ddpo import FlowGRPO
from finetune.rollout import Rollout, concat, sample


def ode_path(start: int, stride: int, T: int) -> list[int]:
    """Sigma-grid indices visited from ``start`` to the end (index T, sigma = 0) every ``stride`` points."""
    path = list(range(start, T + 1, stride))
    return path if path[-1] == T else path + [T]


class G2RPO(FlowGRPO):
    paper = "G²RPO 2025, Granular-GRPO"
    families = ("flow",)
    needs = ("branches",)

    def __init__(self, clip_range: float = 1e-4, adv_clip_max: float = 5.0, kl_beta: float = 0.0,
                 granularities: tuple[int, ...] = (1, 2), branch_steps: tuple[int, ...] | None = None):
        super().__init__(clip_range, adv_clip_max, kl_beta)
        if not granularities or any(int(g) < 1 for g in granularities):
            raise ValueError(f"objective.granularities must be strides >= 1, got {list(granularities)}")
        self.granularities = [int(g) for g in granularities]
        self.branch_steps = None if branch_steps is None else [int(k) for k in branch_steps]

    def steps(self, T: int) -> list[int]:
        steps = list(range(T // 2)) if self.branch_steps is None else self.branch_steps
        if not steps or any(not 0 <= k < T for k in steps):
            raise ValueError(f"objective.branch_steps must be sampler steps in [0, {T}) (model.num_steps={T}), "
                             f"got {steps}")
        return steps

    def check_batching(self, cfg) -> None:
        """Each branching step's minibatches are one optimizer step (times gradient_accumulation_steps),
        so the number of branching steps must be a multiple of the accumulation."""
        if cfg.sample.group_size < 2:
            raise ValueError("objective g2rpo needs sample.group_size >= 2: the branches of a step are its group")
        K, gas = len(self.steps(cfg.model.num_steps)), cfg.train.gradient_accumulation_steps
        if K % gas:
            raise ValueError(f"objective g2rpo trains {K} branching steps per epoch, not a multiple of "
                             f"train.gradient_accumulation_steps={gas}: the last step's gradients would be dropped; "
                             f"set it to a divisor of {K} (1 is the official one step per branching step)")

    # -- rollouts -----------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, ctx, records):
        G, policy = ctx.cfg.sample.group_size, ctx.policy
        gen, parts = ctx.generator(SAMPLING), []
        with self.rollout_context(policy), distributed.autocast(ctx.accelerator):
            for record in records[::G]:
                anchor = sample(policy, [record["prompt"]], ctx.noise(1, gen), [record], trajectory=True,
                                stochastic=False, decode=False)  # the anchor is a path, never scored
                for k in self.steps(len(anchor.timesteps)):
                    parts.append(self.branch(ctx, anchor, k, G, gen))
        return concat(parts)

    def branch(self, ctx, anchor: Rollout, k: int, G: int, gen: torch.Generator) -> Rollout:
        """G branches from the anchor's x_k: one SDE step, then the ODE at every granularity, scored."""
        policy, t, T = ctx.policy, anchor.timesteps[k], len(anchor.timesteps)
        x_k = anchor.latents[:, k]
        expand = (G, *x_k.shape[1:])
        v = policy.predict(x_k, t, anchor.cond)  # one prediction: the branches share x_k
        step = policy.step(v.expand(expand), t, x_k.expand(expand), generator=gen)
        cond = select(anchor.cond, [0] * G)
        x_next = step.prev_sample.to(x_k.dtype)
        x, start = x_next, k + 1
        if start < T:  # the first step after the branch is always at full resolution
            x, start = self.ode(policy, x, cond, [start, start + 1]), start + 1
        finals = [self.ode(policy, x, cond, ode_path(start, g, T)) for g in self.granularities]
        scores, infos = zip(*(ctx.score(policy.latents_to_images(f), anchor.prompts * G, anchor.metadata * G)
                              for f in finals))
        stochastic = torch.zeros(G, T, dtype=torch.bool)
        stochastic[:, k] = True
        return Rollout(prompts=anchor.prompts * G, metadata=anchor.metadata * G, noise=anchor.noise.expand(expand),
                       final=finals[0], images=None, cond=cond, timesteps=anchor.timesteps,
                       latents=torch.stack([x_k.expand(expand), x_next], 1),
                       log_probs=step.log_prob.reshape(G, 1), stochastic_steps=stochastic,
                       rewards=torch.stack(scores, 1), reward_info=infos[0])

    @staticmethod
    def ode(policy, x: torch.Tensor, cond: dict, path: list[int]) -> torch.Tensor:
        """Euler steps x <- x + (sigma_j - sigma_i) v(x, t_i) along the grid indices ``path``."""
        timesteps, sigmas = policy.pipe.scheduler.timesteps, policy.pipe.scheduler.sigmas
        for i, j in zip(path[:-1], path[1:]):
            v = policy.predict(x, timesteps[i], cond).float()
            x = (x.float() + (float(sigmas[j]) - float(sigmas[i])) * v).to(x.dtype)
        return x

    # -- advantages and minibatches ----------------------------------------------------------------
    def advantages(self, ctx, prompts, rewards):
        """Group-normalised per granularity (column), then summed."""
        return group_normalize(rewards.double(), ctx.cfg.sample.group_size).sum(1).float()

    def batches(self, ctx, rollout, advantages):
        """The branching steps in order, one optimizer step each: x_k -> x_{k+1} of every branch at k.

        Minibatches hold whole groups where ``train.batch_size`` is a multiple of the group size, so
        that ``predict`` runs the model once per group (``shared``): its branches share x_k.
        """
        t_cfg, G = ctx.cfg.train, ctx.cfg.sample.group_size
        gen = ctx.generator(BATCHES)
        k_of = rollout.stochastic_steps.float().argmax(1)
        steps = sorted(set(k_of.tolist()))
        per_step = len(rollout) // len(steps)
        distributed.set_accumulation(ctx.accelerator,
                                     math.ceil(per_step / t_cfg.batch_size) * t_cfg.gradient_accumulation_steps)
        shared = G if t_cfg.batch_size % G == 0 else 1
        for _ in range(t_cfg.inner_epochs):
            for k in steps:
                groups = torch.nonzero(k_of == k).flatten().reshape(-1, G)  # rollout rows come group by group
                rows = groups[torch.randperm(len(groups), generator=gen)].flatten()
                for start in range(0, len(rows), t_cfg.batch_size):
                    idx = rows[start:start + t_cfg.batch_size]
                    yield {"x_t": rollout.latents[idx, 0], "x_prev": rollout.latents[idx, 1],
                           "t": rollout.timesteps[k_of[idx]], "old_log_prob": rollout.log_probs[idx, 0],
                           "advantages": advantages[idx], "cond": select(rollout.cond, idx), "shared": shared}

    def predict(self, policy, batch):
        """One forward per group: its ``shared`` consecutive rows have the same x_k, t and prompt."""
        s = batch["shared"]
        out = policy.predict(batch["x_t"][::s], batch["t"][::s], select(batch["cond"], slice(None, None, s)))
        return out.repeat_interleave(s, 0)
