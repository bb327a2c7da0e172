"""What every objective shares: the hooks the trainer calls, an old-policy weight copy, training times.

Two kinds of objectives plug into the trainer:

* sampler-step objectives (``needs = ("trajectory",)``: DDPO, Flow-GRPO) train on recorded steps
  x_t -> x_{t-1} and their log-probs;
* forward-process objectives (``needs = ("final",)``: DiffusionNFT, AWM) train on the clean samples
  x0 only, re-noised at training times t: x_t = noised(x0, eps, t). They say which times with
  ``training_times`` and may keep an old policy (``WeightCopy``) that rollouts or ratios use.

What is trained is the denoiser (LoRA or all of it) unless an objective says otherwise:
``trains_denoiser = False`` freezes it, and ``trained_module(policy)`` returns the module the
optimizer trains instead (FIND's initial-noise policy). ``param_groups`` gives parts of it their
own learning rates, ``initial_latents`` maps the standard noise that starts every sample (rollouts
and evaluation) and ``export`` writes what the run produced beside the LoRA / model.

An epoch calls three hooks in turn, each with a default that the objectives above share:

* ``collect(ctx, records)``: this process's scored ``Rollout`` (default: the sampler on every
  record, finetune/collect.py). Branched rollouts, expert samples or a noise policy override it;
  objectives that learn from demonstrations (``uses_reward = False``) return it unscored.
* ``advantages(ctx, prompts, rewards)``: every process's rewards -> advantages (default: the
  per-prompt normaliser, finetune/advantages.py).
* ``batches(ctx, rollout, advantages)``: the minibatches ``loss`` trains on (default: recorded
  sampler steps, or re-noised clean samples, finetune/batches.py).
"""

from __future__ import annotations

import contextlib

import torch


class Objective:
    families: tuple[str, ...] = ("sd", "flow")
    paper: str = ""  # the citation the README's objectives table shows
    needs: tuple[str, ...] = ("trajectory",)
    deterministic_rollouts = False  # True: rollouts use the ODE / DDIM eta=0 sampler
    uses_reward = True  # False: the trainer neither scores nor normalises (demonstrations, or CTRL's reward in loss)
    trains_denoiser = True  # False: the denoiser stays frozen and ``trained_module`` is trained instead
    # While training: the trainer's distributed wrapper (DDP / DeepSpeed) of ``trained_module``. An
    # objective that trains its own module calls it in ``loss`` so that gradients are averaged.
    net: torch.nn.Module | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether ``policy.reference()`` (the frozen base model) is used: a KL term, or the loss itself."""
        return getattr(self, "kl_beta", 0) > 0

    def check_reward(self, reward) -> None:
        """Refuse (before any model loads) a reward this objective cannot train with."""

    def prepare_data(self, cfg, eval_prompts: list[dict]) -> None:
        """Load and check the data the objective trains on besides its rollouts (before the model loads)."""

    def setup(self, policy, params: list[torch.nn.Parameter]) -> None:
        """Called once the trainable parameters exist (after LoRA is added)."""

    def trained_module(self, policy) -> torch.nn.Module:
        """What the optimizer trains, called after LoRA is added: by default the denoiser."""
        return policy.denoiser

    def param_groups(self, module: torch.nn.Module, lr: float) -> list[dict]:
        """The optimizer's parameter groups (default: every trainable parameter at ``train.lr``)."""
        return [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr}]

    def initial_latents(self, policy, prompts: list[str], eps: torch.Tensor) -> torch.Tensor:
        """The sampler's x_T for ``prompts`` given standard noise ``eps`` (default: ``eps`` itself)."""
        return eps

    def export(self, folder, card: dict) -> None:
        """Write what the run trained besides the denoiser's LoRA / model into ``folder`` (output_dir).

        ``card``: the run's base model, objective, reward, steps and eval results, for a model card.
        """

    def train_steps(self, stochastic: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """(n, k) indices of the recorded steps each sample trains on, in training order.

        ``stochastic`` (n, T) marks the steps sampled from the policy's noise. Default (DDPO): each
        sample its own random k of them, in random order.
        """
        return torch.stack([torch.nonzero(row).flatten()[torch.randperm(int(row.sum()), generator=generator)]
                            for row in stochastic])[:, :k]

    def check_batching(self, cfg) -> None:
        """Refuse (before any model loads) settings whose minibatches would drop gradients."""
        s, t = cfg.sample, cfg.train
        samples, per_step = s.groups_per_epoch * s.group_size, t.batch_size * t.gradient_accumulation_steps
        if samples % per_step:
            raise ValueError(
                f"sample.groups_per_epoch x sample.group_size = {samples} samples per process per epoch must be a "
                f"multiple of train.batch_size x train.gradient_accumulation_steps = {per_step} (samples per "
                "optimizer step), or the last minibatches' gradients would be dropped; change one of them")

    def collect(self, ctx, records: list[dict]):
        """This process's rollouts of ``records`` (prompt groups, contiguous), scored."""
        from finetune.collect import sample_groups

        return sample_groups(ctx, self, records)

    def advantages(self, ctx, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages of all processes' samples (gathered, process-major, groups contiguous)."""
        return torch.as_tensor(ctx.tracker.update(prompts, rewards.numpy()), dtype=torch.float32)

    def batches(self, ctx, rollout, advantages: torch.Tensor):
        """The minibatches of this process's rollout that ``loss`` trains on, in order."""
        from finetune.batches import forward_process_batches, sampler_step_batches

        make = sampler_step_batches if "trajectory" in self.needs else forward_process_batches
        return make(ctx, self, rollout, advantages)

    def rollout_context(self, policy):
        """Weights the rollouts are sampled with (default: the current ones)."""
        return contextlib.nullcontext()

    def start_epoch(self) -> None:
        """Called before the optimisation phase of each epoch, after rollouts."""

    def after_step(self, global_step: int) -> None:
        """Called after every optimizer step (``global_step`` counts them from the start)."""

    def end_epoch(self, global_step: int) -> None:
        """Called after the optimisation phase of each epoch."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint so that a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class WeightCopy:
    """A second copy theta' of the trainable weights, e.g. an old policy, swapped in to evaluate it.

    The reference codes keep it as a second LoRA adapter; a plain copy of the same tensors is the
    same policy without the adapter bookkeeping, and it works for full fine-tuning too.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.values = [p.detach().clone() for p in params]

    @torch.no_grad()
    def soft_update(self, decay: float) -> None:
        """theta' <- decay * theta' + (1 - decay) * theta  (decay 0 copies theta)."""
        for value, p in zip(self.values, self.params):
            value.mul_(decay).add_(p.detach(), alpha=1 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within this block the model computes with theta'; theta is restored afterwards."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, value in zip(self.params, self.values):
                p.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, saved):
                    p.copy_(value)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{i}": v for i, v in enumerate(self.values)}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        with torch.no_grad():
            for i, value in enumerate(self.values):
                value.copy_(state[f"{prefix}{i}"])


def clipped_surrogate(A: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's loss mean[max(-A r, -A clip(r, 1 - eps, 1 + eps))]."""
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(-A * ratio, -A * clipped).mean()


def reference_distance(policy, x_t, time, cond, output: torch.Tensor) -> torch.Tensor:
    """mean || output - output_ref ||^2 against the reference (base) model, no gradient through it."""
    with torch.no_grad(), policy.reference():
        reference = policy.predict(x_t, time, cond)
    return ((output - reference) ** 2).mean()


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift t -> s t / (1 + (s - 1) t); s > 1 moves training towards noisier times."""
    return shift * t / (1 + (shift - 1) * t)


def permuted_grid_times(grid: torch.Tensor, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(k, n): each sample's own random k of the sampler's noise levels (DDPO's timestep subsampling)."""
    index = torch.stack([torch.randperm(len(grid), generator=generator)[:k] for _ in range(n)], 1)
    return grid[index]


def stratified_grid_times(grid: torch.Tensor, n: int, k: int, generator: torch.Generator,
                          skip_first: bool = False, fraction: float = 1.0) -> torch.Tensor:
    """(k, n): one random grid index from each of k equal bins of the grid, shared by the batch.

    ``skip_first`` leaves out the first level (t = 1, pure noise); ``fraction`` keeps the first
    fraction of the grid (the least noisy steps are left out).
    """
    last = max(int(len(grid) * fraction), int(skip_first) + k)
    edges = torch.linspace(int(skip_first), last, k + 1)
    index = []
    for lo, hi in zip(edges[:-1].floor().long().tolist(), edges[1:].floor().long().tolist()):
        index.append(lo + int(torch.randint(max(hi - lo, 1), (1,), generator=generator)))
    return grid[torch.tensor(index).clamp(max=len(grid) - 1)].reshape(k, 1).expand(k, n)


def uniform_times(n: int, k: int, generator: torch.Generator, shift: float = 1.0,
                  low: float = 0.0) -> torch.Tensor:
    """(k, n): stratified uniform times in (low, 1], then shifted; each sample its own draws."""
    u = (torch.arange(k).reshape(k, 1) + torch.rand(k, n, generator=generator)) / k
    return shift_time(low + (1 - low) * u, shift).clamp(min=1e-3)
