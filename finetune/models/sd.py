"""UNet pipelines (SD 1.x/2.x, SDXL via ``sdxl.py``): DDIM as a Gaussian policy.

DDPO (Black et al., 2023, "Training Diffusion Models with Reinforcement Learning") treats each
DDIM step with eta > 0 as a Gaussian policy over the previous latent:

    x0_hat     = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
    sigma_t    = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    mu_t       = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma_t^2) * eps
    x_{t-1}    ~ N(mu_t, sigma_t^2 I)

and the log-density of ``x_{t-1}`` under it is the policy's log-probability of that action.

The UNet may predict eps, v = sqrt(abar) eps - sqrt(1 - abar) x0 (SD 2.x-768, zero-SNR models) or
x0 itself (the scheduler's ``prediction_type``); each is turned into the pair (x0_hat, eps) first,
as DDIMScheduler.step does, so the policy and the forward process are the same for all three.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from finetune import condition
from finetune.models.base import Policy, Step


def _per_sample(values: torch.Tensor, timestep, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=values.device).long().reshape(-1)
    # Negative indices mean "before the first training step": diffusers uses final_alpha_cumprod.
    return values[t.clamp(min=0)].reshape(-1, *([1] * (ndim - 1))), t.reshape(-1, *([1] * (ndim - 1)))


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_scheduler(config) -> None:
    """Refuse, by the scheduler field to change, DDIM settings this module does not reproduce."""
    kind = config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type={kind!r} is not supported; expected one of {PREDICTION_TYPES}")
    if config.get("thresholding"):
        raise ValueError("scheduler thresholding=True (dynamic thresholding of x0) is not supported; "
                         "set the scheduler's `thresholding` to false")
    if config.get("rescale_betas_zero_snr") and kind == "epsilon":
        raise ValueError("scheduler rescale_betas_zero_snr=True with prediction_type='epsilon': at zero terminal "
                         "SNR x0 = (x_t - eps) / sqrt(abar_T) divides by zero; zero-SNR models need "
                         "prediction_type='v_prediction'")


def x0_and_eps(prediction_type: str, output: torch.Tensor, sample: torch.Tensor,
               alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean sample and the noise that a model output implies at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.

    Both are linear in ``output`` (what the forward-process objectives rely on).
    """
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (sample - s * output) / a, output
    if prediction_type == "v_prediction":  # v = a eps - s x0, and a^2 + s^2 = 1
        return a * sample - s * output, a * output + s * sample
    return output, (sample - a * output) / s  # "sample": the output is x0


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                           eta: float = 1.0, prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step that also returns log p(prev_sample | sample), averaged over non-batch dims.

    ``timestep`` is a scalar or one timestep per batch element (a DDIMScheduler timestep after
    ``set_timesteps``). If ``prev_sample`` is given, it is scored instead of sampled. With
    ``eta == 0`` the step is deterministic (diffusers' DDIM) and the returned log-prob is 0.
    """
    prev_sample, log_prob, _, _ = ddim_step(scheduler, model_output, timestep, sample, eta, prev_sample, generator)
    return prev_sample, log_prob


def ddim_step(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None):
    """``ddim_step_with_logprob`` that also returns the step's mean and std: (prev, log_prob, mean, std)."""
    config = scheduler.config
    check_scheduler(config)
    ndim = sample.ndim
    model_output, sample = model_output.float(), sample.float()
    alphas = scheduler.alphas_cumprod.to(sample.device)
    step = config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t, t = _per_sample(alphas, timestep, ndim)
    alpha_prev, t_prev = _per_sample(alphas, t - step, ndim)
    alpha_prev = torch.where(t_prev >= 0, alpha_prev, torch.as_tensor(float(scheduler.final_alpha_cumprod)))

    x0_hat, eps_hat = x0_and_eps(config.prediction_type, model_output, sample, alpha_t)
    if config.clip_sample:  # as DDIMScheduler.step: x0 is clipped, the direction keeps the unclipped eps
        x0_hat = x0_hat.clamp(-config.clip_sample_range, config.clip_sample_range)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std_dev_t = eta * variance.sqrt()
    # At zero terminal SNR with eta = 1 this coefficient is exactly 0; clamp rounding below it.
    direction = (1 - alpha_prev - std_dev_t**2).clamp(min=0).sqrt()
    prev_sample_mean = alpha_prev.sqrt() * x0_hat + direction * eps_hat

    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = prev_sample_mean + std_dev_t * noise
    if eta == 0:
        return prev_sample_mean, torch.zeros(sample.shape[0], device=sample.device), prev_sample_mean, std_dev_t
    log_prob = gaussian_log_prob(prev_sample.detach().float(), prev_sample_mean, std_dev_t)
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all non-batch dimensions."""
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


class SDPolicy(Policy):
    """StableDiffusionPipeline-style model: UNet eps / v / x0 prediction, DDIM steps."""

    family = "sd"
    lora_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe, guidance_scale: float = 4.0, num_steps: int = 20, eta: float = 1.0):
        from diffusers import DDIMScheduler

        if not isinstance(pipe.scheduler, DDIMScheduler):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        check_scheduler(pipe.scheduler.config)
        super().__init__(pipe, guidance_scale, num_steps, eta)

    @property
    def denoiser(self):
        return self.pipe.unet

    def text_encoders(self):
        return [self.pipe.text_encoder]

    @torch.no_grad()
    def encode(self, prompts):
        embeds, neg = self.pipe.encode_prompt(list(prompts), self.device, 1, self.use_guidance)
        cond = {"embeds": embeds}
        if self.use_guidance:
            cond["neg"] = neg
        return cond

    def forward(self, x, t, cond, guidance):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))
        labels = cond.get("class_labels")  # an added condition (finetune/condition.py), if there is one
        if not guidance:
            return self.net(x, t, cond["embeds"], class_labels=labels).sample
        if labels is not None:  # the unconditional branch: empty prompt and the null class
            labels = torch.cat([torch.full_like(labels, len(condition.classes_of(self.denoiser))), labels])
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond["neg"], cond["embeds"]]),
                       class_labels=labels).sample
        return self.guided(out)

    def step(self, model_output, t, x, prev_sample=None, generator=None, noise=None):
        eta = self.noise if noise is None else noise
        return Step(*ddim_step(self.pipe.scheduler, model_output, t, x, eta, prev_sample, generator))

    # Discrete DDPM time: noise level t maps to the nearest of the scheduler's training timesteps.
    def model_time(self, t):
        return (t * (self.pipe.scheduler.config.num_train_timesteps - 1)).round().long()

    def time_grid(self):
        return self.timesteps().float() / (self.pipe.scheduler.config.num_train_timesteps - 1)

    def _alpha_bar(self, t, ndim):
        alphas = self.pipe.scheduler.alphas_cumprod.to(t.device)[self.model_time(t)]
        return alphas.float().reshape(-1, *[1] * (ndim - 1))

    def noised(self, x0, eps, t):
        a = self._alpha_bar(t, x0.ndim)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def target(self, x0, eps, t):
        """The scheduler's regression target: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or x0."""
        kind = self.pipe.scheduler.config.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            a = self._alpha_bar(t, x0.ndim)
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return x0

    def predict_x0(self, x_t, output, t):
        a = self._alpha_bar(t, x_t.ndim)
        return x0_and_eps(self.pipe.scheduler.config.prediction_type, output, x_t, a)[0]

    def latents_to_images(self, latents):
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def scale_latents(self, raw):
        return raw * self.pipe.vae.config.scaling_factor

    def save_lora(self, directory):
        """A LoRA folder that ``load_lora_weights`` reads (with the adapter's config as metadata)."""
        self.pipe.save_lora_weights(directory, unet_lora_layers=self.lora_state_dict(), safe_serialization=True,
                                    unet_lora_adapter_metadata=self.lora_metadata())
