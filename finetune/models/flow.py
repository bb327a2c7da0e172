"""Rectified-flow transformers (SD3/SD3.5-style): the ODE sampler turned into an SDE policy.

Flow-GRPO (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online RL") replaces
the Euler ODE step of a velocity model v with an Euler-Maruyama step of an SDE with the same
marginals. With sigma the current noise level, dt = sigma_next - sigma < 0 and a = noise_level:

    sigma_t = a * sqrt(sigma / (1 - sigma))
    mu      = x + [v + sigma_t^2 / (2 sigma) * (x + (1 - sigma) v)] dt
    x_next  ~ N(mu, sigma_t^2 |dt| I)

(at sigma = 1 the ratio uses the scheduler's second sigma instead, to stay finite). ``a = 0`` is
the deterministic Euler step ``x + v dt``.

``sde_type: cps`` is the coefficient-preserving step (Wang et al., 2025, "Coefficients-Preserving
Sampling for Reinforcement Learning with Flow Matching", adopted by Flow-GRPO). The Euler-Maruyama
step above adds more noise than the schedule removes at low sigma, so late-step samples stay noisy
and their rewards (and log-prob gradients) are dominated by that noise. CPS instead re-noises the
predicted clean sample x0 = x - sigma v with the predicted noise x1 = x + (1 - sigma) v so that
x_next carries exactly sigma_next of noise:

    sigma_t = sigma_next * sin(a pi / 2)
    mu      = (1 - sigma_next) x0 + sqrt(sigma_next^2 - sigma_t^2) x1
    x_next  ~ N(mu, sigma_t^2 I)

The last step (sigma_next = 0) is deterministic. As in the reference code, the CPS "log-prob" is
the Gaussian's exponent without its scale, -mean((x_next - mu)^2): every factor that depends only on
the schedule is dropped. Its gradient is the true score times 2 sigma_t^2, a per-step weight that
fades out the last steps, where sigma_t -> 0 would make the true score explode (sigma_next is
0.001 before the final 0 in the shapes-flow schedule).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from finetune.models.base import Policy, Step
from finetune.models.hub import call_kwargs
from finetune.models.sd import gaussian_log_prob


def sigmas_at(scheduler, timestep, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, sigma_next) for each timestep of a FlowMatchEulerDiscreteScheduler schedule."""
    steps = torch.as_tensor(timestep).reshape(-1)
    index = torch.tensor([scheduler.index_for_timestep(t) for t in steps])
    sigmas = scheduler.sigmas.float()
    shape = (-1, *([1] * (ndim - 1)))
    return sigmas[index].reshape(shape), sigmas[index + 1].reshape(shape)


def sde_step_with_logprob(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                          noise_level: float = 0.7, prev_sample: torch.Tensor | None = None,
                          generator: torch.Generator | None = None):
    """One SDE step; returns (prev_sample, log_prob, prev_sample_mean, std_dev_t).

    ``log_prob`` is log N(prev_sample; mean, (std_dev_t * sqrt(-dt))^2) averaged over non-batch
    dims (0 when ``noise_level == 0``, where the step is the deterministic Euler step).
    """
    model_output, sample = model_output.float(), sample.float()
    sigma, sigma_next = sigmas_at(scheduler, timestep, sample.ndim)
    sigma, sigma_next = sigma.to(sample.device), sigma_next.to(sample.device)
    sigma_max = scheduler.sigmas[1].float().item()
    dt = sigma_next - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    if noise_level == 0:
        return prev_sample_mean, torch.zeros(sample.shape[0], device=sample.device), prev_sample_mean, std_dev_t
    step_std = std_dev_t * torch.sqrt(-dt)
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = prev_sample_mean + step_std * noise
    log_prob = gaussian_log_prob(prev_sample.detach().float(), prev_sample_mean, step_std)
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def cps_step_with_logprob(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                          noise_level: float = 0.7, prev_sample: torch.Tensor | None = None,
                          generator: torch.Generator | None = None):
    """One coefficient-preserving step; returns (prev_sample, log_prob, prev_sample_mean, std_dev_t).

    ``log_prob`` is -(prev_sample - mean)^2 averaged over non-batch dims (the reference code's
    scale-free log-likelihood, module docstring); 0 when sampling a deterministic step
    (``noise_level == 0``, which is the Euler step, or sigma_next == 0).
    """
    model_output, sample = model_output.float(), sample.float()
    sigma, sigma_next = sigmas_at(scheduler, timestep, sample.ndim)
    sigma, sigma_next = sigma.to(sample.device), sigma_next.to(sample.device)
    std_dev_t = sigma_next * math.sin(noise_level * math.pi / 2)
    x0 = sample - sigma * model_output
    x1 = sample + (1 - sigma) * model_output
    prev_sample_mean = (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - std_dev_t**2) * x1
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = -((prev_sample.detach().float() - prev_sample_mean) ** 2).mean(dim=tuple(range(1, sample.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


SDE_STEPS = {"sde": sde_step_with_logprob, "cps": cps_step_with_logprob}


class FlowPolicy(Policy):
    """StableDiffusion3Pipeline-style model: MMDiT velocity prediction, Euler / SDE steps.

    FLUX shares the maths; its packed latents, embedded guidance and shifted schedule are
    ``FluxPolicy``'s (flux.py).
    """

    family = "flow"
    # Flow-GRPO's SD3 targets: the joint attention's projections ("attn." leaves SD3.5's second,
    # image-only attention ``attn2`` untouched, as the reference does).
    lora_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, pipe, guidance_scale: float = 4.0, num_steps: int = 20, noise_level: float = 0.7):
        super().__init__(pipe, guidance_scale, num_steps, noise_level)
        # T5 positions of the prompt embedding; without a T5 encoder they are zeros. SD3 was trained
        # with them (diffusers' default 256); a model trained without them declares 0 in its folder.
        self.max_sequence_length = call_kwargs(pipe).get("max_sequence_length", 256)
        self.sde_type = "sde"

    @property
    def sde_type(self) -> str:
        return self._sde_type

    @sde_type.setter
    def sde_type(self, value: str) -> None:
        if value not in SDE_STEPS:
            raise ValueError(f"model.sde_type={value!r} is not a flow sampler step; use one of {sorted(SDE_STEPS)}")
        self._sde_type = value

    @property
    def denoiser(self):
        return self.pipe.transformer

    def text_encoders(self):
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)
                if m is not None]

    @torch.no_grad()
    def encode(self, prompts):
        prompts = list(prompts)
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=self.use_guidance,
            max_sequence_length=self.max_sequence_length)
        cond = {"embeds": embeds, "pooled": pooled}
        if self.use_guidance:
            cond.update(neg=neg, neg_pooled=neg_pooled)
        return cond

    def forward(self, x, t, cond, guidance):
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1).expand(len(x))
        if not guidance:
            return self.net(x, cond["embeds"], cond["pooled"], t).sample
        out = self.net(torch.cat([x, x]), torch.cat([cond["neg"], cond["embeds"]]),
                            torch.cat([cond["neg_pooled"], cond["pooled"]]), torch.cat([t, t])).sample
        return self.guided(out)

    def step(self, model_output, t, x, prev_sample=None, generator=None, noise=None):
        level = self.noise if noise is None else noise
        step = SDE_STEPS[self.sde_type]
        return Step(*step(self.pipe.scheduler, model_output, t, x, level, prev_sample, generator))

    def model_time(self, t):
        return t * self.pipe.scheduler.config.num_train_timesteps

    def time_grid(self):
        return self.timesteps().float() / self.pipe.scheduler.config.num_train_timesteps

    def noised(self, x0, eps, t):
        t = t.reshape(-1, *[1] * (x0.ndim - 1))
        return (1 - t) * x0 + t * eps

    def target(self, x0, eps, t):
        return eps - x0

    def predict_x0(self, x_t, output, t):
        return x_t - t.reshape(-1, *[1] * (x_t.ndim - 1)) * output

    def latents_to_images(self, latents):
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    def scale_latents(self, raw):
        config = self.pipe.vae.config
        return (raw - (config.shift_factor or 0.0)) * config.scaling_factor

    def save_lora(self, directory):
        from peft.utils import get_peft_model_state_dict

        # SD3's LoRA loader reads peft's own key names (no conversion, unlike the UNet's).
        self.pipe.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(self.denoiser),
                                    transformer_lora_adapter_metadata=self.lora_metadata())
