"""What an objective sees of the run in one epoch, and the default way it collects its rollouts.

An objective's ``collect(ctx, records)`` turns this process's prompt records (each prompt repeated
``sample.group_size`` times, groups contiguous) into a scored ``Rollout``. The default,
``sample_groups``, runs the policy's sampler on them in batches of ``sample.batch_size``, recording
what the objective ``needs``. Objectives that collect differently (branched rollouts, expert samples,
a noise policy) build their rollout from the same pieces: ``ctx.noise``, ``sample`` and ``ctx.score``.

Every random draw of epoch e on process r comes from ``ctx.generator(purpose)``, seeded with
(seed, e, r, purpose), so a run resumed from a checkpoint continues exactly as the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from omegaconf import DictConfig

from finetune import distributed
from finetune.advantages import PerPromptStatTracker
from finetune.models.base import Policy
from finetune.rollout import Rollout, concat, sample
from finetune.timing import Phases
from rewards.base import check_finite

# Generator purposes within an epoch: prompt choice, sampling noise, minibatch order, shared group noise.
PROMPTS, SAMPLING, BATCHES, GROUP_NOISE = range(4)


def epoch_generator(seed: int, epoch: int, rank: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1009 + rank) * 17 + purpose)


@dataclass
class EpochContext:
    cfg: DictConfig
    epoch: int
    policy: Policy
    reward: Any  # rewards.base.Reward
    accelerator: Any  # accelerate.Accelerator
    tracker: PerPromptStatTracker
    phases: Phases = field(default_factory=Phases)  # the trainer's, so reward calls are timed apart

    def generator(self, purpose: int) -> torch.Generator:
        return epoch_generator(self.cfg.seed, self.epoch, self.accelerator.process_index, purpose)

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n initial latents x_T, drawn on the generator's device and moved (as diffusers does)."""
        return randn_tensor((n, *self.policy.latent_shape()), generator=generator, device=self.accelerator.device)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
        with self.phases("reward"):
            out = self.reward(images, prompts, metadata)
        return check_finite(out.scores.float(), self.reward.name), out.info

    def sde_window(self, gen: torch.Generator) -> tuple[int, int] | None:
        """Flow-GRPO-Fast: ``sample.sde_window_size`` consecutive stochastic steps per sampling batch,
        starting uniformly in ``sample.sde_window_range`` (default: the first half of the steps)."""
        size = self.cfg.sample.get("sde_window_size")
        if not size:
            return None
        steps = self.cfg.model.num_steps
        lo, hi = self.cfg.sample.get("sde_window_range") or (0, max(size, steps // 2))
        if not (0 <= lo <= hi - size and hi <= steps):
            raise ValueError(f"sample.sde_window_range [{lo}, {hi}] must hold a window of sample.sde_window_size "
                             f"{size} within model.num_steps {steps}; widen the range or shrink the window")
        start = int(torch.randint(lo, hi - size + 1, (1,), generator=gen))
        return start, start + size


def sample_groups(ctx: EpochContext, objective, records: list[dict]) -> Rollout:
    """The default rollouts: the sampler on every record, scored, in batches of ``sample.batch_size``."""
    s, acc = ctx.cfg.sample, ctx.accelerator
    gen = ctx.generator(SAMPLING)
    if s.get("shared_noise"):
        # DanceGRPO's shared initial noise: a group differs only by the sampler's own noise, so
        # its reward spread (the advantage) measures the policy's actions, not the luck of x_T.
        groups = len(records) // s.group_size
        shared = randn_tensor((groups, *ctx.policy.latent_shape()), generator=ctx.generator(GROUP_NOISE))
        shared = shared.repeat_interleave(s.group_size, 0)
    parts = []
    for i in range(0, len(records), s.batch_size):
        chunk = records[i:i + s.batch_size]
        noise = shared[i:i + s.batch_size].to(acc.device) if s.get("shared_noise") else ctx.noise(len(chunk), gen)
        with objective.rollout_context(ctx.policy), distributed.autocast(acc):
            ro = sample(ctx.policy, [r["prompt"] for r in chunk], noise, chunk,
                        trajectory="trajectory" in objective.needs, generator=gen,
                        stochastic=not objective.deterministic_rollouts, window=ctx.sde_window(gen))
        ro.rewards, ro.reward_info = ctx.score(ro.images, ro.prompts, ro.metadata)
        ro.images = None  # scored: the decoded images are not needed again (GPU memory at 1024 px)
        parts.append(ro)
    return concat(parts)
