"""Log-probabilities of the stochastic samplers: consistency, an independent formula, eta = 0."""

import math

import numpy as np
import pytest
import torch

from finetune.models import wrap_pipeline
from finetune.models.flow import cps_step_with_logprob, sde_step_with_logprob
from finetune.models.sd import ddim_step_with_logprob
from finetune.rollout import sample
from tests.helpers import tiny_sd, tiny_sd3

PROMPTS = ["a photo of a red circle", "a photo of two stars", "a photo of a square left of a star"]


def independent_log_density(x, mean, std):
    """Gaussian log-density by the textbook formula, in float64, averaged per sample."""
    x, mean, std = (np.asarray(v, dtype=np.float64) for v in (x, mean, std))
    std = np.broadcast_to(std, x.shape)
    dens = -0.5 * np.log(2 * np.pi * std**2) - (x - mean) ** 2 / (2 * std**2)
    return dens.reshape(len(x), -1).mean(1)


@pytest.mark.parametrize("make,sde_type", [(tiny_sd, None), (tiny_sd3, "sde"), (tiny_sd3, "cps")],
                         ids=["sd", "flow", "flow-cps"])
def test_recomputed_log_prob_equals_recorded(make, sde_type):
    policy = wrap_pipeline(make(), guidance_scale=3.0, num_steps=5)
    if sde_type:
        policy.sde_type = sde_type
    noise = policy.initial_noise([1, 2, 3])
    ro = sample(policy, PROMPTS, noise, trajectory=True, generator=torch.Generator().manual_seed(0))
    assert ro.latents.shape[1] == 6 and ro.log_probs.shape == (3, 5)
    for j, t in enumerate(ro.timesteps):
        out = policy.predict(ro.latents[:, j], t, ro.cond)
        step = policy.step(out, t, ro.latents[:, j], prev_sample=ro.latents[:, j + 1])
        ratio = torch.exp(step.log_prob - ro.log_probs[:, j])
        assert torch.allclose(ratio, torch.ones(3), atol=1e-5)


def test_ddim_log_prob_matches_an_independent_gaussian():
    pipe = tiny_sd()
    sched = pipe.scheduler
    sched.set_timesteps(10)
    t = sched.timesteps[3]  # 651 with steps_offset 1
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    prev, logp = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    # DDIM (Song et al.) by hand with eta = 1.
    abar = sched.alphas_cumprod.double()
    a_t, a_prev = abar[int(t)], abar[int(t) - 100]
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps.double()
    expected = independent_log_density(prev, mean, sigma)
    assert np.allclose(logp.numpy(), expected, atol=1e-4)
    # The last step goes to the final alpha (prev timestep < 0).
    t_last = sched.timesteps[-1]
    prev, logp = ddim_step_with_logprob(sched, eps, t_last, x, eta=1.0, prev_sample=x * 0.9)
    a_t, a_prev = abar[int(t_last)], torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps.double()
    assert np.allclose(logp.numpy(), independent_log_density(x * 0.9, mean, sigma), atol=1e-4)


def test_sde_log_prob_matches_an_independent_gaussian():
    sched = tiny_sd3().scheduler
    sched.set_timesteps(8)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = 0.7
    for k in (0, 3):  # k = 0 is sigma = 1, where sigma_max stands in for the ratio
        t = sched.timesteps[k]
        prev, logp, mean, std = sde_step_with_logprob(sched, v, t, x, a, generator=torch.Generator().manual_seed(1))
        s, s_next = float(sched.sigmas[k]), float(sched.sigmas[k + 1])
        ratio_sigma = s if s < 1 else float(sched.sigmas[1])
        sig_t = a * math.sqrt(s / (1 - ratio_sigma))
        dt = s_next - s
        mu = x.double() + (v.double() + sig_t**2 / (2 * s) * (x.double() + (1 - s) * v.double())) * dt
        assert torch.allclose(mean.double(), mu, atol=1e-5)
        assert np.allclose(logp.numpy(), independent_log_density(prev, mu, sig_t * math.sqrt(-dt)), atol=1e-4)


def test_noise_level_zero_is_the_euler_step():
    sched = tiny_sd3().scheduler
    sched.set_timesteps(4)
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    prev, *_ = sde_step_with_logprob(sched, v, sched.timesteps[1], x, noise_level=0.0)
    assert torch.allclose(prev, x + (sched.sigmas[2] - sched.sigmas[1]) * v, atol=1e-6)


def test_cps_step_matches_its_formula_and_preserves_the_noise_coefficient():
    sched = tiny_sd3().scheduler
    sched.set_timesteps(8)
    a, k = 0.7, 3
    s, s_next = float(sched.sigmas[k]), float(sched.sigmas[k + 1])
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 4, 16, 16, generator=gen), torch.randn(4, 4, 16, 16, generator=gen)
    x = (1 - s) * x0 + s * eps
    v = eps - x0  # the exact velocity: predicted x0 and x1 are the true ones
    prev, logp, mean, std = cps_step_with_logprob(sched, v, sched.timesteps[k], x, a, generator=gen)
    sig_t = s_next * math.sin(a * math.pi / 2)
    mu = (1 - s_next) * x0.double() + math.sqrt(s_next**2 - sig_t**2) * eps.double()
    assert torch.allclose(mean.double(), mu, atol=1e-5)
    assert np.allclose(std.reshape(-1).numpy(), sig_t)
    # The reference code's scale-free log-likelihood: the Gaussian exponent without 1 / (2 sigma_t^2).
    expected = -((prev.double() - mu) ** 2).reshape(4, -1).mean(1)
    assert np.allclose(logp.numpy(), expected.numpy(), atol=1e-5)
    # x_next = (1 - sigma_next) x0 + noise whose variance is sigma_next^2: the schedule's coefficient.
    residual = prev.double() - (1 - s_next) * x0.double()
    assert abs(residual.var().item() / s_next**2 - 1) < 0.05


def test_cps_is_deterministic_at_the_last_step_and_euler_without_noise():
    sched = tiny_sd3().scheduler
    sched.set_timesteps(4)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prev, logp, mean, std = cps_step_with_logprob(sched, v, sched.timesteps[-1], x, 0.7)
    assert torch.equal(prev, mean) and torch.equal(logp, torch.zeros(2)) and float(std.max()) == 0
    assert torch.allclose(prev, x + (0 - sched.sigmas[3]) * v, atol=1e-6)  # sigma_next = 0: x0 itself
    prev, *_ = cps_step_with_logprob(sched, v, sched.timesteps[1], x, noise_level=0.0)
    assert torch.allclose(prev, x + (sched.sigmas[2] - sched.sigmas[1]) * v, atol=1e-6)


def test_unknown_sde_type_is_refused_by_name():
    policy = wrap_pipeline(tiny_sd3(), num_steps=2)
    with pytest.raises(ValueError, match="model.sde_type='ode'.*cps"):
        policy.sde_type = "ode"


@pytest.mark.parametrize("make", [tiny_sd, tiny_sd3], ids=["sd", "flow"])
def test_deterministic_sampling_equals_the_diffusers_pipeline(make):
    pipe = make()
    policy = wrap_pipeline(pipe, guidance_scale=3.0, num_steps=6)
    noise = policy.initial_noise([5, 6])
    ours = sample(policy, PROMPTS[:2], noise, stochastic=False).images
    theirs = pipe(prompt=PROMPTS[:2], latents=noise.clone(), num_inference_steps=6, guidance_scale=3.0,
                  output_type="pt").images
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
