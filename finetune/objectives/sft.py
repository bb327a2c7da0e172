"""Supervised fine-tuning on expert demonstrations: the baseline every demonstration objective must beat.

The plain denoising loss of pretraining on the expert set's (prompt, image) pairs. With x0 a draw
from the VAE posterior of an expert image, eps ~ N(0, I) and t the training time,

    x_t = noised(x0, eps, t)              (DDPM: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; flow: (1 - t) x0 + t eps)
    L   = mean || f_theta(x_t, t, c) - target(x0, eps, t) ||^2

with the family's regression target (eps, v, or the velocity eps - x0) and the denoiser's
conditional output (no guidance). Times: uniform for DDPM models (diffusers' text-to-image training),
logit-normal for flow models (SD3's training default), or as ``time_sampling`` says. A prompt is
replaced by "" with probability ``prompt_dropout``, which keeps the unconditional branch that
classifier-free guidance needs; the default 0.2 is the data setting of the official Diffusion-DRO
code (``finetune/objectives/dro.py``), so that both objectives see the same demonstrations.

No reward model is involved: the epoch's "rollout" is a draw of ``sample.groups_per_epoch x
sample.group_size`` demonstrations (by tag when ``prompts.balance: tag`` and the set has a ``tag``
column), and ``reward`` only matters for evaluation.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor

from finetune.collect import PROMPTS, EpochContext
from finetune.objectives.base import Objective
from finetune.rollout import Rollout

TIME_SAMPLINGS = ("uniform", "logit_normal")


class DemonstrationObjective(Objective):
    """Shared by objectives that learn from ``data.expert``: loading, checking, drawing demonstrations."""

    needs = ("final",)
    uses_reward = False

    def __init__(self, prompt_dropout: float = 0.2):
        if not 0 <= prompt_dropout < 1:
            raise ValueError(f"objective.prompt_dropout must be in [0, 1), got {prompt_dropout}")
        self.prompt_dropout = prompt_dropout
        self.expert = None

    def prepare_data(self, cfg, eval_prompts: list[dict]) -> None:
        from finetune.expert import prepare_expert

        self.expert = prepare_expert(cfg, cfg.train.batch_size, eval_prompts)

    def demonstrations(self, ctx: EpochContext, n: int) -> Rollout:
        """n expert (prompt, x0) pairs for this process and epoch."""
        if self.expert.mean is None:
            self.expert.encode(ctx.policy, Path(ctx.cfg.output_dir) / "expert_latents.safetensors")
        rng = random.Random(int(ctx.generator(PROMPTS).initial_seed()))
        index = self.expert.draw(n, rng, balance_tags=ctx.cfg.prompts.get("balance") == "tag")
        prompts = ["" if rng.random() < self.prompt_dropout else self.expert.prompts[i] for i in index]
        x0 = self.expert.latents(ctx.policy, index)
        return Rollout(prompts=prompts, metadata=[{"row": i} for i in index], noise=torch.zeros(0), final=x0,
                       images=None, cond=ctx.policy.embed(prompts))

    def collect(self, ctx: EpochContext, records: list[dict]) -> Rollout:
        return self.demonstrations(ctx, len(records))

    def predict(self, policy, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's conditional output at noise level t (the quantity pretraining regresses)."""
        return policy.forward(x_t, policy.model_time(t), cond, guidance=False)


class SFT(DemonstrationObjective):
    paper = "baseline: supervised fine-tuning"

    def __init__(self, prompt_dropout: float = 0.2, time_sampling: str | None = None):
        super().__init__(prompt_dropout)
        if time_sampling not in (None, *TIME_SAMPLINGS):
            raise ValueError(f"objective.time_sampling must be null (the family's default) or one of "
                             f"{TIME_SAMPLINGS}, got {time_sampling!r}")
        self.time_sampling = time_sampling

    def training_times(self, policy, n: int, generator: torch.Generator) -> torch.Tensor:
        """(1, n) noise levels in (0, 1]: one per sample, as in pretraining."""
        kind = self.time_sampling or ("logit_normal" if policy.family == "flow" else "uniform")
        if kind == "logit_normal":
            t = torch.sigmoid(randn_tensor((n,), generator=generator))
        else:
            t = torch.rand(n, generator=generator)
        return t.clamp(min=1e-3).reshape(1, n)

    def loss(self, policy, batch: dict) -> tuple[torch.Tensor, dict]:
        """``batch``: x0, eps, t, cond (``forward_process_batches``)."""
        x0, eps, t = batch["x0"], batch["eps"], batch["t"]
        output = self.predict(policy, policy.noised(x0, eps, t), t, batch["cond"])
        loss = ((output.float() - policy.target(x0, eps, t).float()) ** 2).mean()
        return loss, {"denoising_loss": loss.detach()}
