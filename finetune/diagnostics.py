"""Is there a learning signal? The gradient signal-to-noise ratio of an objective on a recipe.

An objective's gradient from one epoch's rollouts (n samples) is an estimate g = mu + noise of the
expected gradient mu, the noise having total variance T/n. Two independent epochs give

    E[cos(g1, g2)] ~= |mu|^2 / (|mu|^2 + T/n),

so the per-sample signal-to-noise ratio is rho = |mu|^2 / T = c / ((1 - c) n) for the mean cosine c,
and 1/rho samples per optimizer step make signal and noise equally large (cos = 1/2). When rho is
tiny, every step is mostly a random walk: the model drifts and its held-out score falls whatever
the reward says. ``diffrl diagnose snr`` measures this on the recipe's first trainable weights,
before any update, so objectives, rewards and settings can be compared in minutes instead of runs.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def epoch_gradient(trainer, epoch: int) -> tuple[torch.Tensor, float]:
    """The objective's gradient over one epoch's rollouts (all minibatches, no update); mean reward.

    Sets ``trainer.reward_calls``: the images scored this epoch on this process (an objective that
    scores several completions per trained sample, as G²RPO, pays for all of them).
    """
    rollout, advantages, stats = trainer.collect(epoch)
    trainer.reward_calls = len(rollout) if rollout.rewards is None else rollout.rewards.numel()
    if trainer.objective.trains_denoiser:
        trainer.policy.net = trainer.net
    trainer.objective.start_epoch()
    batches = trainer.objective.batches(trainer.context(epoch), rollout, advantages)
    for p in trainer.params:
        p.grad = None
    count = 0
    for batch in batches:
        loss, _ = trainer.objective.loss(trainer.policy, batch)
        trainer.accelerator.backward(loss)
        count += 1
    trainer.policy.net = trainer.policy.denoiser
    # An auxiliary regression trained beside the policy (FIND's reward predictor) is left out: its
    # gradient agrees across batches without saying anything about the policy's signal.
    signal = getattr(trainer.objective, "signal_parameters", None)
    gradient = flat_grad(signal() if signal else trainer.params) / count
    for p in trainer.params:
        p.grad = None
    return gradient, stats["reward_mean"]


def flat_grad(params) -> torch.Tensor:
    """The parameters' gradients as one float32 CPU vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).float().cpu()


def epoch_step_gradients(trainer, epoch: int) -> tuple[torch.Tensor, float]:
    """One epoch's policy gradient split by sampler step: (T, P), row k from step k of every sample.

    Only for objectives trained on the sampler's log-probs (DDPO, Flow-GRPO): their gradient is the
    sum of these rows, so the rows show which steps carry the signal and which only add noise.
    Rows of deterministic steps are zero.
    """
    if "trajectory" not in trainer.objective.needs:
        raise ValueError(f"--per-step needs an objective trained on every recorded sampler step (ddpo, "
                         f"flow_grpo, loop), not {trainer.cfg.objective.name!r}")
    from finetune.batches import step_batch

    rollout, advantages, stats = trainer.collect(epoch)
    trainer.policy.net = trainer.net
    trainer.objective.start_epoch()
    n, T = rollout.log_probs.shape
    rows = []
    for k in range(T):
        for p in trainer.params:
            p.grad = None
        # A deterministic step (outside an SDE window) has no log-prob to train: the trainer skips it,
        # and scoring it under the stochastic kernel would add a systematic, signal-free gradient.
        samples = torch.nonzero(rollout.stochastic_steps[:, k].cpu()).flatten()
        for start in range(0, len(samples), trainer.cfg.train.batch_size):
            idx = samples[start:start + trainer.cfg.train.batch_size]
            batch = step_batch(rollout, advantages, idx, torch.full((len(idx),), k))
            loss, _ = trainer.objective.loss(trainer.policy, batch)
            loss.backward()  # plain backward: rows must be comparable, whatever accumulation is set
        rows.append(flat_grad(trainer.params))
    trainer.policy.net = trainer.policy.denoiser
    for p in trainer.params:
        p.grad = None
    return torch.stack(rows), stats["reward_mean"]


def snr(gradients: list[torch.Tensor], samples_per_gradient: int) -> dict:
    """Mean pairwise cosine of independent gradient estimates and what it implies (module docstring).

    The pairs share gradients, so their spread understates the uncertainty; ``cos_sem`` is the
    jackknife standard error over the gradients themselves (leave one gradient out).
    """
    unit = torch.stack([g / g.norm().clamp_min(1e-30) for g in gradients]).double()
    cos = (unit @ unit.T).numpy()
    k = len(gradients)
    pairs = list(itertools.combinations(range(k), 2))
    cosines = [float(cos[i, j]) for i, j in pairs]
    c = float(np.mean(cosines))
    leave_one_out = np.array([np.mean([cos[i, j] for i, j in pairs if m not in (i, j)]) for m in range(k)])
    sem = float(np.sqrt((k - 1) / k * np.sum((leave_one_out - leave_one_out.mean()) ** 2))) if k > 2 else float("nan")
    rho = max(c, 0.0) / ((1 - c) * samples_per_gradient)
    return {"cosines": cosines, "mean_cos": c, "cos_sem": sem,
            "per_sample_snr": rho, "samples_for_snr_1": 1 / rho if rho > 0 else float("inf")}


def measure(cfg, batches: int = 4, first_epoch: int = 1000, per_step: bool = False) -> dict:
    """Build the recipe's trainer and measure the gradient SNR over ``batches`` independent epochs.

    ``per_step`` adds ``steps``: for each sampler step k, the SNR of its own gradient and its mean
    norm, and ``first``: the SNR of the gradient of steps [0, k] together.
    """
    from finetune.trainer import Trainer

    trainer = Trainer(cfg)
    s = cfg.sample
    trainer.reward_calls = s.groups_per_epoch * s.group_size
    gradients, rewards = [], []
    for k in range(batches):
        g, r = (epoch_step_gradients if per_step else epoch_gradient)(trainer, first_epoch + k)
        gradients.append(g)
        rewards.append(r)
    n = trainer.reward_calls * trainer.accelerator.num_processes  # samples (reward calls) per gradient
    if per_step:
        rows = torch.stack(gradients)  # (batches, T, P)
        steps = [{**snr(list(rows[:, k]), n), "norm": float(rows[:, k].norm(dim=1).mean())}
                 for k in range(rows.shape[1])]
        first = [snr(list(rows[:, :k + 1].sum(1)), n) for k in range(rows.shape[1])]
        gradients = list(rows.sum(1))
    result = snr(gradients, n)
    if per_step:
        result.update(steps=steps, first=first)
    result["reward_mean"] = float(np.mean(rewards))
    result["reward_calls"] = n
    result["gradient_norm"] = float(np.mean([float(g.norm()) for g in gradients]))
    return result
