"""v-prediction (SD 2.x-768, zero-SNR models) in the DDIM policy and the forward process.

Oracles: diffusers' own DDIMScheduler.step (the step's mean, and its sample for the same noise),
torch.distributions.Normal in float64 (the log-prob), and the scheduler's add_noise / get_velocity
(the forward process).
"""

import pytest
import torch
from diffusers import DDIMScheduler

from finetune.config import load_config
from finetune.models import wrap_pipeline
from finetune.models.sd import ddim_step_with_logprob
from finetune.rollout import sample
from finetune.trainer import Trainer
from tests.helpers import FAST, tiny_sd_v

PROMPTS = ["a photo of a red circle", "a photo of two stars"]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
CONFIGS = {  # SD 2.x-768 (leading spacing), and zero terminal SNR with trailing spacing (Lin et al., 2023)
    "v-leading": dict(prediction_type="v_prediction", steps_offset=1),
    "v-zero-snr-trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                timestep_spacing="trailing"),
    "eps-trailing": dict(prediction_type="epsilon", timestep_spacing="trailing"),
    "sample": dict(prediction_type="sample", steps_offset=1),
    "v-clipped": dict(prediction_type="v_prediction", steps_offset=1, clip_sample=True),
}


def scheduler(name, steps=5):
    sched = DDIMScheduler(**{**SD, **CONFIGS[name]})
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("name", CONFIGS)
def test_step_equals_diffusers_ddim_step(name):
    sched = scheduler(name)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps:  # every step, the first (zero SNR: abar_t = 0) and the last (final alpha) included
        mean, logp = ddim_step_with_logprob(sched, out, t, x, eta=0.0)
        expected = sched.step(out, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(logp, torch.zeros(2))
        # eta = 1 with the same noise: diffusers' stochastic DDIM step.
        prev, logp = ddim_step_with_logprob(sched, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(1))
        expected = sched.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
        torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(logp).all()


@pytest.mark.parametrize("name", ["v-leading", "v-zero-snr-trailing"])
def test_v_log_prob_matches_an_independent_gaussian(name):
    sched = scheduler(name, steps=10)
    abar = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for k in (0, 4, 9):
        t = int(sched.timesteps[k])
        prev, logp = ddim_step_with_logprob(sched, v, t, x, eta=0.8, generator=g)
        # By hand: x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0, solved for x0 and eps.
        a_t = abar[t]
        a_prev = abar[t - 100] if t >= 100 else torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
        x0 = a_t.sqrt() * x.double() - (1 - a_t).sqrt() * v.double()
        eps = (1 - a_t).sqrt() * x.double() + a_t.sqrt() * v.double()
        sigma = 0.8 * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        expected = torch.distributions.Normal(mean, sigma).log_prob(prev.double()).flatten(1).mean(1)
        torch.testing.assert_close(logp.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_forward_process_round_trips_and_matches_the_scheduler(prediction_type):
    policy = wrap_pipeline(tiny_sd_v(prediction_type=prediction_type), guidance_scale=1.0, num_steps=10)
    sched = policy.pipe.scheduler
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = policy.time_grid()[[0, 3, 6, 9]]
    x_t, target = policy.noised(x0, eps, t), policy.target(x0, eps, t)
    torch.testing.assert_close(policy.predict_x0(x_t, target, t), x0, rtol=1e-4, atol=1e-4)
    timesteps = policy.model_time(t)
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, timesteps), rtol=1e-5, atol=1e-5)
    expected = {"epsilon": eps, "v_prediction": sched.get_velocity(x0, eps, timesteps), "sample": x0}[prediction_type]
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)


def test_zero_snr_round_trip_at_pure_noise():
    """At zero terminal SNR (abar = 0 at t = 1) v-prediction stays finite: x0 = -v, x_t = eps."""
    policy = wrap_pipeline(tiny_sd_v(rescale_betas_zero_snr=True, timestep_spacing="trailing"), num_steps=4)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = policy.time_grid()[:1].expand(2)
    assert float(t[0]) == 1.0
    torch.testing.assert_close(policy.noised(x0, eps, t), eps)
    torch.testing.assert_close(policy.predict_x0(eps, policy.target(x0, eps, t), t), x0)


def test_unsupported_scheduler_settings_are_refused_by_field():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        wrap_pipeline(tiny_sd_v(prediction_type="epsilon", rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="thresholding"):
        wrap_pipeline(tiny_sd_v(thresholding=True))


@pytest.mark.parametrize("extra", [{}, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}],
                         ids=["leading", "zero-snr-trailing"])
def test_v_policy_samples_as_the_pipeline_and_rescores_its_steps(extra):
    pipe = tiny_sd_v(**extra)
    policy = wrap_pipeline(pipe, guidance_scale=3.0, num_steps=3)
    noise = policy.initial_noise([5, 6])
    ours = sample(policy, PROMPTS, noise, stochastic=False).images
    theirs = pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=3, guidance_scale=3.0,
                  output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    ro = sample(policy, PROMPTS, noise, trajectory=True, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ro.log_probs).all()  # zero SNR at eta = 1: the direction coefficient is exactly 0
    for j, t in enumerate(ro.timesteps):
        step = policy.step(policy.predict(ro.latents[:, j], t, ro.cond), t, ro.latents[:, j],
                           prev_sample=ro.latents[:, j + 1])
        torch.testing.assert_close(step.log_prob, ro.log_probs[:, j], rtol=0, atol=1e-5)


def test_one_ddpo_epoch_on_a_v_prediction_model(tmp_path):
    tiny_sd_v().save_pretrained(tmp_path / "model")
    cfg = load_config("configs/ddpo_shapes_sd.yaml", FAST + [f"model.path={tmp_path / 'model'}",
                                                             f"output_dir={tmp_path / 'run'}", "train.epochs=1"])
    trainer = Trainer(cfg)
    assert trainer.policy.pipe.scheduler.config.prediction_type == "v_prediction"
    before = {n: p.detach().clone() for n, p in trainer.trainable_state().items()}
    history = trainer.train()
    assert torch.isfinite(torch.tensor(history[-1]["reward_mean"]))
    assert any(not torch.equal(before[n], p) for n, p in trainer.trainable_state().items())
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()

