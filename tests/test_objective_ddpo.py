"""DDPO / Flow-GRPO surrogate against hand-computed values and gradients."""

import numpy as np
import pytest
import torch

from finetune.models.base import Step
from finetune.objectives import build_objective
from finetune.objectives.ddpo import DDPO


class FakePolicy:
    """step() returns a chosen log-prob tensor (a leaf we can differentiate with respect to)."""

    def __init__(self, log_prob, mean=None, ref_mean=None, std=None):
        self.log_prob, self.mean, self.ref_mean, self.std = log_prob, mean, ref_mean, std
        self.in_reference = False

    def predict(self, x, t, cond):
        return x

    def step(self, out, t, x, prev_sample=None):
        mean = self.ref_mean if self.in_reference else self.mean
        return Step(prev_sample, self.log_prob, mean, self.std)

    def reference(self):
        policy = self

        class Ctx:
            def __enter__(self):
                policy.in_reference = True

            def __exit__(self, *exc):
                policy.in_reference = False

        return Ctx()


def batch(n, old, adv):
    return {"x_t": torch.zeros(n, 1, 2, 2), "x_prev": torch.zeros(n, 1, 2, 2), "t": torch.zeros(n),
            "old_log_prob": old, "advantages": adv, "cond": {}}


def test_clipped_surrogate_value_and_gradient():
    eps = 0.2
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    new = torch.tensor([0.1, -0.5, 0.5, 0.05], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    loss, info = DDPO(clip_range=eps, adv_clip_max=5.0).loss(FakePolicy(new), batch(4, old, adv))
    r = np.exp(new.detach().numpy())
    a = adv.numpy()
    terms = np.maximum(-a * r, -a * np.clip(r, 1 - eps, 1 + eps))
    assert loss.item() == pytest.approx(terms.mean(), abs=1e-6)
    loss.backward()
    # d/dlogp of max(...): -A r / n where the unclipped term is active, 0 where the clip is.
    unclipped_active = (-a * r) >= (-a * np.clip(r, 1 - eps, 1 + eps))
    expected = np.where(unclipped_active, -a * r / 4, 0.0)
    assert np.allclose(new.grad.numpy(), expected, atol=1e-6)
    # Sign: a positive advantage pushes the log-prob up (negative gradient of the loss).
    assert new.grad[0] < 0 and new.grad[3] > 0
    assert info["clipfrac"].item() == pytest.approx(np.mean(np.abs(r - 1) > eps))


def test_advantages_are_clipped_before_use():
    new = torch.zeros(2, requires_grad=True)
    loss, _ = DDPO(clip_range=0.2, adv_clip_max=1.0).loss(FakePolicy(new), batch(2, torch.zeros(2), torch.tensor([10.0, -10.0])))
    loss.backward()
    assert torch.allclose(new.grad, torch.tensor([-0.5, 0.5]))


def test_flow_grpo_kl_term():
    new = torch.zeros(2, requires_grad=True)
    mean = torch.ones(2, 1, 2, 2)
    ref_mean = torch.zeros(2, 1, 2, 2)
    std = torch.full((2, 1, 1, 1), 0.5)
    policy = FakePolicy(new, mean, ref_mean, std)
    loss, info = build_objective("flow_grpo", "flow", kl_beta=0.1).loss(policy, batch(2, torch.zeros(2), torch.zeros(2)))
    # KL = mean((mu - mu_ref)^2) / (2 std^2) = 1 / (2 * 0.25) = 2; loss = 0 + 0.1 * 2.
    assert info["kl"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.2)


def test_flow_grpo_kl_is_zero_on_a_deterministic_step():
    mean = torch.ones(2, 1, 2, 2, requires_grad=True)
    std = torch.tensor([0.5, 0.0]).reshape(2, 1, 1, 1)  # CPS's last step has std 0
    policy = FakePolicy(torch.zeros(2, requires_grad=True), mean, torch.zeros(2, 1, 2, 2), std)
    loss, info = build_objective("flow_grpo", "flow", kl_beta=0.1).loss(policy, batch(2, torch.zeros(2), torch.zeros(2)))
    assert info["kl"].item() == pytest.approx(1.0)  # (2 + 0) / 2
    loss.backward()
    assert torch.isfinite(mean.grad).all() and mean.grad[1].abs().sum() == 0


def test_objective_registry_errors():
    with pytest.raises(ValueError, match="unknown objective 'ppo'.*available: ddpo, flow_grpo"):
        build_objective("ppo", "sd")
    with pytest.raises(ValueError, match="needs a flow model.*sd model"):
        build_objective("flow_grpo", "sd")


def test_timestep_fraction_random_subset_for_ddpo_first_steps_for_flow_grpo():
    """DDPO trains each sample on its own random k of its stochastic steps; Flow-GRPO, like its
    reference code, on the first k in sampler order (0.99 of 10 steps drops only the last one)."""
    all_steps = torch.ones(64, 10, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    ddpo = build_objective("ddpo", "sd").train_steps(all_steps, 9, gen)
    assert ddpo.shape == (64, 9)
    assert all(len(set(row.tolist())) == 9 for row in ddpo)
    assert (ddpo == 9).any() and len({tuple(row.tolist()) for row in ddpo}) > 1  # the last step is sometimes in
    flow = build_objective("flow_grpo", "flow").train_steps(all_steps, int(10 * 0.99), gen)
    assert flow.tolist() == [list(range(9))] * 64
    window = torch.zeros(4, 10, dtype=torch.bool)
    window[:, 2:6] = True  # Flow-GRPO-Fast: only the window's steps are stochastic
    assert build_objective("flow_grpo", "flow").train_steps(window, 3, gen).tolist() == [[2, 3, 4]] * 4
