"""DiffusionNFT and AWM against independently written formulas on random tensors."""

import contextlib

import pytest
import torch

from finetune.objectives import build_objective
from finetune.objectives.awm import AWM, weighted_log_prob
from finetune.objectives.base import WeightCopy, shift_time, stratified_grid_times, uniform_times
from finetune.objectives.nft import DiffusionNFT, old_policy_decay

SHAPE = (6, 2, 3, 3)


class LinearFlow:
    """A velocity model v = W x + b * t on flattened latents, with the rectified-flow process."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        d = SHAPE[1] * SHAPE[2] * SHAPE[3]
        self.W = torch.nn.Parameter(0.3 * torch.randn(d, d, generator=g))
        self.b = torch.nn.Parameter(torch.randn(d, generator=g))
        self.ref = (self.W.detach().clone(), self.b.detach().clone())
        self.use_ref = False

    @property
    def params(self):
        return [self.W, self.b]

    def forward(self, x, time, cond, guidance):
        W, b = self.ref if self.use_ref else (self.W, self.b)
        t = (time / 1000).reshape(-1, 1)
        return (x.flatten(1) @ W.T + b * t).reshape(x.shape)

    def predict(self, x, time, cond):
        return self.forward(x, time, cond, False)

    @contextlib.contextmanager
    def reference(self):
        self.use_ref = True
        yield
        self.use_ref = False

    def model_time(self, t):
        return t * 1000

    def noised(self, x0, eps, t):
        return (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps

    def target(self, x0, eps, t):
        return eps - x0

    def predict_x0(self, x_t, v, t):
        return x_t - t.reshape(-1, 1, 1, 1) * v

    def time_grid(self):
        return torch.linspace(1, 0, 11)[:-1]


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    n = SHAPE[0]
    return {"x0": torch.randn(SHAPE, generator=g), "eps": torch.randn(SHAPE, generator=g),
            "t": torch.rand(n, generator=g) * 0.9 + 0.05, "advantages": torch.randn(n, generator=g) * 3, "cond": {}}


def nft_with(policy, **kw):
    nft = DiffusionNFT(kl_beta=0.0, **kw)
    nft.setup(policy, policy.params)
    return nft


def perturb(policy, scale=0.1, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def grads(loss, params):
    return torch.autograd.grad(loss, params)


# -- DiffusionNFT -------------------------------------------------------------------------------

def reference_nft_loss(policy, old_params, batch, beta, A_max):
    """The paper's loss, written out independently (no shared helpers)."""
    x0, eps, t, A = batch["x0"], batch["eps"], batch["t"], batch["advantages"]
    tt = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    W, b = policy.W, policy.b
    v = (x_t.flatten(1) @ W.T + b * t.reshape(-1, 1)).reshape(x_t.shape)
    Wo, bo = old_params
    v_old = (x_t.flatten(1) @ Wo.T + bo * t.reshape(-1, 1)).reshape(x_t.shape)
    r = torch.clamp(torch.clamp(A, -A_max, A_max) / A_max / 2 + 0.5, 0, 1)
    total = 0
    for i in range(len(x0)):
        x_pos = x_t[i] - t[i] * (beta * v[i] + (1 - beta) * v_old[i])
        x_neg = x_t[i] - t[i] * ((1 + beta) * v_old[i] - beta * v[i])
        l_pos = ((x_pos - x0[i]) ** 2).mean() / max((x_pos - x0[i]).abs().mean().item(), 1e-5)
        l_neg = ((x_neg - x0[i]) ** 2).mean() / max((x_neg - x0[i]).abs().mean().item(), 1e-5)
        total = total + A_max * (r[i] * l_pos + (1 - r[i]) * l_neg) / beta
    return total / len(x0)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_nft_loss_and_gradient_match_the_written_out_formula(beta):
    policy = LinearFlow()
    nft = nft_with(policy, beta=beta)
    perturb(policy)  # theta != theta_old
    batch = data()
    loss, _ = nft.loss(policy, batch)
    expected = reference_nft_loss(policy, nft.old.values, batch, beta, 5.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads(loss, policy.params), grads(expected, policy.params)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_nft_r1_beta1_is_adaptive_weighted_flow_matching():
    policy = LinearFlow()
    nft = nft_with(policy, beta=1.0)
    perturb(policy)
    batch = data()
    batch["advantages"] = torch.full((SHAPE[0],), 7.0)  # clipped to A_max -> r = 1
    loss, _ = nft.loss(policy, batch)
    x_t = policy.noised(batch["x0"], batch["eps"], batch["t"])
    v = policy.forward(x_t, policy.model_time(batch["t"]), {}, False)
    err = (v - (batch["eps"] - batch["x0"])) * batch["t"].reshape(-1, 1, 1, 1)  # x0_pred - x0 = t (v* - v)
    fm = (err ** 2).mean(dim=(1, 2, 3)) / err.abs().mean(dim=(1, 2, 3)).detach()
    assert loss.item() == pytest.approx(5.0 * fm.mean().item(), rel=1e-5)
    # A gradient step on r = 1 samples lowers the plain flow-matching error.
    before = ((v - (batch["eps"] - batch["x0"])) ** 2).mean().item()
    for p, g in zip(policy.params, grads(loss, policy.params)):
        p.data -= 1e-3 * g
    v2 = policy.forward(x_t, policy.model_time(batch["t"]), {}, False)
    assert ((v2 - (batch["eps"] - batch["x0"])) ** 2).mean().item() < before


def test_nft_positive_equals_negative_when_theta_is_old():
    policy = LinearFlow()
    nft = nft_with(policy, beta=0.5)
    batch = data()
    loss, info = nft.loss(policy, batch)
    assert info["loss_pos"].item() == pytest.approx(info["loss_neg"].item(), rel=1e-6)
    # With l+ = l-, r drops out: L = A_max * l / beta for any advantages.
    batch["advantages"] = -batch["advantages"]
    loss2, _ = nft.loss(policy, batch)
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-6)
    assert loss.item() == pytest.approx(5.0 * info["loss_pos"].item() / 0.5, rel=1e-6)


def test_nft_pulls_average_samples_back_to_the_old_policy_awm_does_not():
    # With D = t beta (v_theta - v_old) and e = x_t - t v_old - x0: x0+ - x0 = e - D, x0- - x0 = e + D, so
    # r l+ + (1 - r) l- ~ |e|^2 + |D|^2 - 2 (2r - 1) e.D: advantage-weighted matching plus a proximal
    # term. A sample at r = 1/2 (advantage 0) pulls v_theta back to v_old; in AWM it has no gradient.
    policy = LinearFlow()
    nft = nft_with(policy, beta=1.0)
    batch = {**data(), "advantages": torch.zeros(SHAPE[0])}
    for p, g in zip(policy.params, grads(nft.loss(policy, batch)[0], policy.params)):
        assert g.abs().max().item() < 1e-6  # theta = theta_old: l+ and l- cancel exactly
    perturb(policy, scale=0.05)
    x_t = policy.noised(batch["x0"], batch["eps"], batch["t"])
    time = policy.model_time(batch["t"])

    def distance_to_old():
        with nft.old.swapped_in():
            v_old = policy.predict(x_t, time, {}).detach()
        return ((policy.predict(x_t, time, {}) - v_old) ** 2).mean()

    before = distance_to_old().item()
    for p, g in zip(policy.params, grads(nft.loss(policy, batch)[0], policy.params)):
        p.data -= 1e-3 * g
    assert distance_to_old().item() < before
    awm = awm_with(policy, weighting="uniform", clip_range=0.2, ema_beta=0.0)
    perturb(policy, scale=0.05, seed=6)
    awm.after_step(1)  # off-policy: the ratio against the rollout policy is no longer 1
    for g in grads(awm.loss(policy, batch)[0], policy.params):
        assert g.abs().max().item() == 0.0  # without its proximal EMA term AWM has no such pull


def test_nft_optimality_probability():
    nft = DiffusionNFT(adv_clip_max=5.0)
    r = nft.optimality(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 9.0]))
    assert torch.allclose(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_nft_kl_term_is_the_velocity_distance_to_the_reference():
    policy = LinearFlow()
    nft = DiffusionNFT(kl_beta=0.0)
    nft.setup(policy, policy.params)
    perturb(policy)
    batch = data()
    base, _ = nft.loss(policy, batch)
    nft.kl_beta = 0.25
    loss, info = nft.loss(policy, batch)
    x_t = policy.noised(batch["x0"], batch["eps"], batch["t"])
    time = policy.model_time(batch["t"])
    with policy.reference():
        v_ref = policy.forward(x_t, time, {}, False)
    kl = ((policy.forward(x_t, time, {}, False) - v_ref) ** 2).mean()
    assert kl.item() > 0 and info["kl"].item() == pytest.approx(kl.item(), rel=1e-6)
    assert loss.item() == pytest.approx(base.item() + 0.25 * kl.item(), rel=1e-6)


def test_old_policy_soft_update_and_decay_schedules():
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    copy = WeightCopy(p)
    with torch.no_grad():
        p[0].copy_(torch.tensor([3.0, -2.0]))
    copy.soft_update(0.25)  # 0.25 * old + 0.75 * new
    assert torch.allclose(copy.values[0], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2]))
    with copy.swapped_in():
        assert torch.allclose(p[0], copy.values[0])
    assert torch.equal(p[0].detach(), torch.tensor([3.0, -2.0]))  # restored
    assert [old_policy_decay(s, 1) for s in (0, 1, 100, 499, 500, 10_000)] == pytest.approx(
        [0.0, 0.001, 0.1, 0.499, 0.5, 0.5])
    assert [old_policy_decay(s, 2) for s in (0, 74, 75, 100, 208, 10_000)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.1875, 0.9975, 0.999])
    assert old_policy_decay(10_000, 0) == 0.0


def test_nft_end_epoch_moves_the_old_policy_by_the_schedule():
    policy = LinearFlow()
    nft = nft_with(policy, decay_type=1)
    old_W = policy.W.detach().clone()
    perturb(policy)
    nft.end_epoch(global_step=200)  # d = 0.2
    assert torch.allclose(nft.old.values[0], 0.2 * old_W + 0.8 * policy.W.detach(), atol=1e-6)


# -- AWM ----------------------------------------------------------------------------------------

def awm_with(policy, **kw):
    kw.setdefault("ema_beta", 0.0)  # the policy term alone; the proximal EMA term has its own tests
    awm = AWM(kl_beta=0.0, **kw)
    awm.setup(policy, policy.params)
    awm.start_epoch()
    return awm


@pytest.mark.parametrize("weighting", ["uniform", "ghuber"])
def test_awm_first_step_gradient_is_advantage_weighted_matching(weighting):
    policy = LinearFlow()
    awm = awm_with(policy, weighting=weighting)
    batch = data()
    loss, _ = awm.loss(policy, batch)
    # Independently: L' = mean(A' * w(mse)) with A' = clip(A, 5) / 5, i.e. -A' log p_hat.
    x0, eps, t = batch["x0"], batch["eps"], batch["t"]
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    v = policy.forward(x_t, t * 1000, {}, False)
    mse = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    w = mse if weighting == "uniform" else ((mse + 1e-10) ** 0.25 - 1e-10**0.25) * t / 0.25
    A = batch["advantages"].clamp(-5, 5) / 5
    matching = (A * w).mean()
    assert loss.item() == pytest.approx(-A.mean().item(), rel=1e-6)  # ratio = 1 on-policy
    for got, want in zip(grads(loss, policy.params), grads(matching, policy.params)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_awm_negative_weight_scales_only_the_worse_samples():
    policy = LinearFlow()
    batch = data()
    x0, eps, t = batch["x0"], batch["eps"], batch["t"]
    A = batch["advantages"].clamp(-5, 5) / 5
    assert (A < 0).any() and (A > 0).any()
    for negative_weight in (0.0, 0.3):
        loss, _ = awm_with(policy, weighting="uniform", negative_weight=negative_weight).loss(policy, batch)
        v = policy.forward(policy.noised(x0, eps, t), t * 1000, {}, False)
        mse = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
        A_w = torch.where(A < 0, negative_weight * A, A)
        for got, want in zip(grads(loss, policy.params), grads((A_w * mse).mean(), policy.params)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="objective.negative_weight"):
        AWM(negative_weight=-1.0)


def test_awm_ratio_uses_the_rollout_policy_after_a_step():
    policy = LinearFlow()
    awm = awm_with(policy, clip_range=0.05, weighting="uniform")
    batch = data()
    x0, eps, t = batch["x0"], batch["eps"], batch["t"]
    x_t = policy.noised(x0, eps, t)
    logp_old = -((policy.forward(x_t, t * 1000, {}, False) - (eps - x0)) ** 2).mean(dim=(1, 2, 3)).detach()
    perturb(policy, scale=0.02)
    awm.after_step(1)
    loss, info = awm.loss(policy, batch)
    logp = -((policy.forward(x_t, t * 1000, {}, False) - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    ratio = torch.exp(logp - logp_old)
    A = batch["advantages"].clamp(-5, 5) / 5
    expected = torch.maximum(-A * ratio, -A * ratio.clamp(0.95, 1.05)).mean()
    assert (ratio - 1).abs().max() > 1e-3  # the step moved the policy
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_awm_weightings_by_hand():
    mse, t = torch.tensor([0.5, 2.0]), torch.tensor([0.2, 0.9])
    assert torch.allclose(weighted_log_prob(mse, t, "uniform"), -mse)
    assert torch.allclose(weighted_log_prob(mse, t, "t"), -mse * t)
    expected = -torch.tensor([(0.5 + 1e-10) ** 0.5 - 1e-5, (2.0 + 1e-10) ** 0.5 - 1e-5]) * t / 0.5
    assert torch.allclose(weighted_log_prob(mse, t, "ghuber", power=0.5), expected)
    with pytest.raises(ValueError, match="objective.weighting"):
        AWM(weighting="cubic")


def test_training_time_samplers():
    grid = torch.linspace(1, 0, 15)[:-1]  # 14 sampler steps
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = stratified_grid_times(grid, 3, 6, g, skip_first=True, fraction=0.9)
        assert t.shape == (6, 3) and (t == t[:, :1]).all()  # shared by the batch
        index = [int(torch.argmin((grid - v).abs())) for v in t[:, 0]]
        assert index == sorted(index) and len(set(index)) == 6 and 0 not in index and max(index) < 12
    u = uniform_times(5, 4, g, shift=3.0, low=0.2)
    assert u.shape == (4, 5) and (u <= 1).all() and (u >= shift_time(torch.tensor(0.2), 3.0)).all()
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(1.5 / 2.0)


def test_forward_objectives_refuse_bad_settings():
    with pytest.raises(ValueError, match="objective.beta"):
        build_objective("nft", "flow", beta=0.0)
    with pytest.raises(ValueError, match="objective.time_type"):
        build_objective("awm", "flow", time_type="logit")
    assert build_objective("awm", "sd").needs == ("final",)  # both families have a forward process


@pytest.mark.parametrize("family", ["sd", "flow"])
def test_policy_forward_process_is_consistent(family):
    """The clean sample implied by the exact pretraining target is x0 again, on both families."""
    from finetune.models import wrap_pipeline
    from tests.helpers import tiny_sd, tiny_sd3

    policy = wrap_pipeline(tiny_sd() if family == "sd" else tiny_sd3(), guidance_scale=1.0, num_steps=10)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = policy.time_grid()[[1, 3, 6, 9]]
    x_t = policy.noised(x0, eps, t)
    assert torch.allclose(policy.predict_x0(x_t, policy.target(x0, eps, t), t), x0, atol=1e-4)
    # Little noise near t = 0, almost only noise at the sampler's first (noisiest) level.
    assert (policy.noised(x0, eps, torch.zeros(4)) - x0).abs().max() < 0.15
    first = policy.noised(x0, eps, policy.time_grid()[:1].expand(4))
    assert (first - eps).abs().mean() < 0.2 * (first - x0).abs().mean()
    assert (policy.model_time(t) - policy.timesteps().float()[[1, 3, 6, 9]]).abs().max() < 1e-3


def test_awm_proximal_ema_term_and_gradient_match_the_written_out_formula():
    """L = policy term + ema_beta * mean (v_theta - v_ema)^2, v_ema from the lagging copy, no gradient through it."""
    policy = LinearFlow()
    batch = {**data(), "advantages": torch.zeros(SHAPE[0])}  # no policy gradient: the proximal term alone
    awm = awm_with(policy, weighting="uniform", ema_beta=0.7)
    ema_W, ema_b = policy.W.detach().clone(), policy.b.detach().clone()
    perturb(policy, scale=0.05)
    loss, info = awm.loss(policy, batch)
    x0, eps, t = batch["x0"], batch["eps"], batch["t"]
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    flat, tt = x_t.flatten(1), t.reshape(-1, 1)
    diff = (flat @ policy.W.T + policy.b * tt) - (flat @ ema_W.T + ema_b * tt)  # (n, d)
    assert info["ema_kl"].item() == pytest.approx((diff ** 2).mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.7 * (diff ** 2).mean().item(), rel=1e-6)
    # d/dW mean(diff^2) = 2 diff^T x / (n d), d/db = 2 sum_i diff_i t_i / (n d): written out by hand.
    n, d = diff.shape
    want_W, want_b = 0.7 * 2 * diff.T @ flat / (n * d), 0.7 * 2 * (diff * tt).sum(0) / (n * d)
    got_W, got_b = grads(loss, policy.params)
    assert torch.allclose(got_W, want_W, rtol=1e-4, atol=1e-7) and torch.allclose(got_b, want_b, rtol=1e-4, atol=1e-7)
    # A gradient step shrinks the distance to the EMA: the term is proximal.
    with torch.no_grad():
        policy.W -= 0.5 * got_W
        policy.b -= 0.5 * got_b
    assert awm.loss(policy, batch)[1]["ema_kl"].item() < info["ema_kl"].item()


def test_awm_ema_follows_the_official_linear_schedule():
    policy = LinearFlow()
    awm = awm_with(policy, ema_beta=1.0)
    assert [awm.ema_decay(s) for s in (0, 1, 100, 300, 10_000)] == pytest.approx([0.0, 0.001, 0.1, 0.3, 0.3])
    start = policy.W.detach().clone()
    perturb(policy)
    awm.end_epoch(global_step=200)  # d = 0.2
    assert torch.allclose(awm.ema.values[0], 0.2 * start + 0.8 * policy.W.detach(), atol=1e-6)
    awm.end_epoch(global_step=0)  # d = 0: the copy is the policy itself, so the term is zero at theta
    assert torch.equal(awm.ema.values[0], policy.W.detach())
    assert AWM(kl_ema_decay_type="constant", kl_ema_decay=0.9).ema_decay(5) == 0.9
    state = awm.state_dict()
    other = awm_with(LinearFlow(seed=3), ema_beta=1.0)
    other.load_state_dict(state)
    assert torch.equal(other.ema.values[0], awm.ema.values[0])
    with pytest.raises(ValueError, match="objective.kl_ema_decay_type"):
        AWM(kl_ema_decay_type="cosine")
