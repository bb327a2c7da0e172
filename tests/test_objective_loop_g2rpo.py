"""LOOP and Granular-GRPO: advantages by hand, G²RPO's branched rollouts against an independent
re-computation on a tiny flow model, its one-step-per-branch batching and the surrogate's sign."""

import math

import numpy as np
import pytest
import torch

from finetune.advantages import group_normalize, leave_one_out
from finetune.config import load_config
from finetune.objectives import build_objective
from finetune.objectives.g2rpo import ode_path
from finetune.rollout import sample
from finetune.trainer import Trainer
from tests.helpers import FAST, save_tiny_models


class Ctx:
    """The part of EpochContext the advantage hooks read."""

    def __init__(self, group_size):
        self.cfg = load_config("configs/g2rpo_shapes_flow.yaml", [f"sample.group_size={group_size}"])


def test_leave_one_out_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])
    # group 1: the others' means are 11/3, 10/3, 3, 2; group 2: 2/3, 2/3, 1/3, 1/3
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, -2 / 3, -2 / 3, 2 / 3, 2 / 3])
    torch.testing.assert_close(leave_one_out(rewards, 4), expected)
    # = K/(K-1) (r_i - group mean): the group mean's own share of r_i removed
    torch.testing.assert_close(leave_one_out(rewards, 4)[:4], 4 / 3 * (rewards[:4] - rewards[:4].mean()))
    with pytest.raises(ValueError, match="sample.group_size=3"):
        leave_one_out(rewards, 3)


def test_loop_advantages_are_per_sampled_group_not_per_prompt_string():
    loop = build_objective("loop", "sd")
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0])
    A = loop.advantages(Ctx(2), ["a", "a", "a", "a"], rewards)  # the same prompt picked twice: two groups
    torch.testing.assert_close(A, torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    scaled = build_objective("loop", "sd", std_normalize=True).advantages(Ctx(2), ["a"] * 4, rewards)
    torch.testing.assert_close(scaled, A / (rewards.std() + 1e-4))


def test_group_normalize_by_hand_unbiased_std_per_column():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 7.0]])
    out = group_normalize(rewards, 2)
    s = math.sqrt(2.0)  # unbiased std of {1, 3} and of {5, 7}; {0, 0} has std 0
    expected = torch.tensor([[-1 / s, 0.0], [1 / s, 0.0], [0.0, -1 / s], [0.0, 1 / s]])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_g2rpo_advantage_is_the_sum_of_per_granularity_group_advantages():
    rng = np.random.default_rng(0)
    rewards = rng.random((12, 3))  # 3 groups of 4 branches, 3 granularities
    expected = np.zeros(12)
    for g in range(3):
        for start in range(0, 12, 4):
            block = rewards[start:start + 4, g]
            expected[start:start + 4] += (block - block.mean()) / (block.std(ddof=1) + 1e-8)
    A = build_objective("g2rpo", "flow").advantages(Ctx(4), ["p"] * 12, torch.tensor(rewards))
    np.testing.assert_allclose(A.numpy(), expected, rtol=1e-5)


def test_ode_path_strides_then_jumps_to_the_end():
    assert ode_path(3, 1, 6) == [3, 4, 5, 6]
    assert ode_path(3, 2, 10) == [3, 5, 7, 9, 10]  # the stride misses sigma = 0: a last jump
    assert ode_path(4, 2, 10) == [4, 6, 8, 10]
    assert ode_path(10, 2, 10) == [10]


@pytest.fixture(scope="module")
def g2rpo(tmp_path_factory):
    models = save_tiny_models(tmp_path_factory.mktemp("models"))
    cfg = load_config("configs/g2rpo_shapes_flow.yaml", FAST + [
        f"model.path={models / 'flow'}", f"output_dir={tmp_path_factory.mktemp('run')}", "model.num_steps=6",
        "sample.groups_per_epoch=2", "sample.group_size=4", "train.batch_size=3", "objective.granularities=[1,2]"])
    trainer = Trainer(cfg)
    rollout, advantages, _ = trainer.collect(0)
    return trainer, rollout, advantages


def test_g2rpo_branches_share_x_k_differ_only_at_k_and_complete_by_the_ode(g2rpo):
    trainer, rollout, _ = g2rpo
    policy, G, T = trainer.policy, 4, 6
    steps = [0, 1, 2]  # the first half of 6 steps
    assert len(rollout) == 2 * len(steps) * G
    sigmas = policy.pipe.scheduler.sigmas
    for block, start in enumerate(range(0, len(rollout), G)):
        k = steps[block % len(steps)]
        rows = slice(start, start + G)
        assert rollout.stochastic_steps[rows].sum(1).eq(1).all() and rollout.stochastic_steps[rows, k].all()
        x_k, x_next = rollout.latents[rows, 0], rollout.latents[rows, 1]
        assert (x_k == x_k[:1]).all()  # exactly the same x_k
        assert all(not torch.equal(x_next[i], x_next[j]) for i in range(G) for j in range(i))
        # x_k is the deterministic anchor from the group's shared noise, recomputed independently
        anchor = sample(policy, rollout.prompts[start:start + 1], rollout.noise[start:start + 1], trajectory=True,
                        stochastic=False)
        torch.testing.assert_close(anchor.latents[0, k], x_k[0], rtol=1e-5, atol=1e-6)
        cond = {n: v[rows] for n, v in rollout.cond.items()}
        t = rollout.timesteps[k]
        step = policy.step(policy.predict(x_k, t, cond), t, x_k, prev_sample=x_next)
        torch.testing.assert_close(step.log_prob, rollout.log_probs[rows, 0], rtol=1e-4, atol=1e-5)
        # granularity 1: the policy's own deterministic steps from x_{k+1} to the end
        x = x_next
        for j in range(k + 1, T):
            x = policy.step(policy.predict(x, rollout.timesteps[j], cond), rollout.timesteps[j], x, noise=0.0).prev_sample
        torch.testing.assert_close(x, rollout.final[rows], rtol=1e-4, atol=1e-5)
        # granularity 2: one full step, then every second sigma, a last jump to 0; scored by the reward
        path = [k + 1, k + 2] + list(range(k + 4, T + 1, 2))
        path = path if path[-1] == T else path + [T]
        x = x_next
        for i, j in zip(path[:-1], path[1:]):
            x = x + (sigmas[j] - sigmas[i]) * policy.predict(x, rollout.timesteps[i], cond)
        brightness = policy.latents_to_images(x).mean(dim=(1, 2, 3))
        torch.testing.assert_close(rollout.rewards[rows, 1], brightness, rtol=1e-4, atol=1e-5)


def test_g2rpo_trains_one_optimizer_step_per_branching_step(g2rpo):
    trainer, rollout, advantages = g2rpo
    batches = list(trainer.objective.batches(trainer.context(0), rollout, advantages))
    per_step = len(rollout) // 3
    assert trainer.accelerator.gradient_accumulation_steps == math.ceil(per_step / 3)
    assert len(batches) == 3 * math.ceil(per_step / 3)
    ks = [int(b["t"].unique().numel()) for b in batches]
    assert ks == [1] * len(batches)  # one branching step per minibatch, in sampler order
    times = [float(b["t"][0]) for b in batches]
    assert times == sorted(times, reverse=True)
    before = trainer.global_step
    trainer.optimize(0, rollout, advantages)
    assert trainer.global_step - before == 3


def test_g2rpo_surrogate_gradient_raises_the_log_prob_of_better_branches(g2rpo):
    trainer, rollout, advantages = g2rpo
    policy, objective = trainer.policy, trainer.objective
    batch = next(iter(objective.batches(trainer.context(0), rollout, advantages)))
    policy.net = policy.denoiser

    def log_probs():
        x_t, t = batch["x_t"], batch["t"]
        return policy.step(policy.predict(x_t, t, batch["cond"]), t, x_t, prev_sample=batch["x_prev"]).log_prob

    saved = [p.detach().clone() for p in trainer.params]
    try:
        before = log_probs().detach()
        batch["old_log_prob"] = before  # on-policy (ratio 1), whatever earlier tests trained
        loss, _ = objective.loss(policy, batch)
        loss.backward()
        norm = torch.cat([p.grad.flatten() for p in trainer.params]).norm()
        assert norm > 0
        with torch.no_grad():
            for p in trainer.params:  # a small descent step of norm 0.05
                p -= 0.05 / norm * p.grad
                p.grad = None
        change = log_probs().detach() - before
        assert float((batch["advantages"] * change).sum()) > 0  # descent raises sum_i A_i log p_i
    finally:
        with torch.no_grad():
            for p, value in zip(trainer.params, saved):
                p.copy_(value)


def test_g2rpo_one_forward_per_group_gives_the_per_row_loss_and_gradient(g2rpo):
    trainer, rollout, advantages = g2rpo
    policy, objective = trainer.policy, trainer.objective
    trainer.cfg.train.batch_size = 4  # = the group size: whole groups per minibatch
    batch = next(iter(objective.batches(trainer.context(0), rollout, advantages)))
    trainer.cfg.train.batch_size = 3
    assert batch["shared"] == 4 and (batch["x_t"] == batch["x_t"][:1]).all()
    policy.net = policy.denoiser
    results = []
    for shared in (4, 1):
        loss, _ = objective.loss(policy, {**batch, "shared": shared})
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer.params]))
        for p in trainer.params:
            p.grad = None
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
