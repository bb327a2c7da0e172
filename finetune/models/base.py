"""The interface every model family offers to samplers and objectives.

A ``Policy`` wraps a diffusers pipeline. Its trainable part is ``denoiser`` (UNet or transformer,
usually with a LoRA adapter); text encoders and VAE stay frozen. Conditioning is a dict of tensors
with the batch first, so objectives can slice it like the latents.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Step:
    """Result of one stochastic sampler step."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor  # (B,), averaged over latent dims
    prev_sample_mean: torch.Tensor
    std_dev_t: torch.Tensor


def select(cond: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in cond.items()}


class Policy:
    family: str  # "sd" (UNet predicting eps / v / x0, DDIM) or "flow" (velocity, Euler / SDE)
    lora_modules: tuple[str, ...]

    def __init__(self, pipe, guidance_scale: float, num_steps: int, noise: float):
        self.pipe = pipe
        self.guidance_scale = guidance_scale
        self.num_steps = num_steps
        self.noise = noise  # eta for DDIM, noise_level for the flow SDE
        for module in (pipe.vae, *self.text_encoders()):
            module.requires_grad_(False)
        self.pipe.set_progress_bar_config(disable=True)
        # What forward() calls: the denoiser itself, or its distributed wrapper while training.
        self.net = self.denoiser
        self._frozen_reference = None
        self.condition: str | None = None  # the class sampled when the denoiser has an added condition
        # Prompt embeddings kept per (prompt, guidance) row, least recently used evicted; 0 = off.
        self.embedding_cache_size = 0
        self._embeddings: OrderedDict[tuple[str, bool], dict[str, torch.Tensor]] = OrderedDict()

    # -- what each family implements -------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    def text_encoders(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt (and, with guidance, empty-prompt) embeddings."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance: bool) -> torch.Tensor:
        """Raw denoiser output (eps or velocity) for a batch, classifier-free guided if asked."""
        raise NotImplementedError

    def step(self, model_output, t, x, prev_sample=None, generator=None, noise=None) -> Step:
        raise NotImplementedError

    def timesteps(self) -> torch.Tensor:
        """The sampler's timesteps for ``num_steps`` steps (resets the scheduler)."""
        self.pipe.scheduler.set_timesteps(self.num_steps, device=self.device)
        return self.pipe.scheduler.timesteps

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """A VAE encoder's latent sample -> the denoiser's latent space (the inverse of the decode's scaling)."""
        raise NotImplementedError

    # The forward (noising) process, for objectives that train on x_t = noised(x0, eps, t) instead
    # of the sampler's steps. ``t`` in (0, 1] is the noise level per sample (1 = pure noise).
    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's time input for noise level ``t``."""
        raise NotImplementedError

    def time_grid(self) -> torch.Tensor:
        """The noise levels t of the sampler's ``num_steps`` steps, noisiest first."""
        raise NotImplementedError

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser regresses in pretraining (eps or v for UNets, the velocity eps - x0 for flows)."""
        raise NotImplementedError

    def predict_x0(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by a denoiser output (linear in the output)."""
        raise NotImplementedError

    def save_lora(self, directory: str | Path) -> None:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``encode``, served from the embedding cache when ``embedding_cache_size`` > 0.

        The text encoders are frozen, so a prompt's embeddings never change during a run: with a
        prompt set that repeats across epochs (every RL recipe) only the first visit pays for the
        text encoders (for T5-XXL the largest forward of a step). Rows pad to the tokenizers' fixed
        length, so cached and fresh rows stack.
        """
        if not self.embedding_cache_size:
            return self.with_condition(self.encode(prompts))
        keys = [(p, self.use_guidance) for p in prompts]
        missing = list(dict.fromkeys(k[0] for k in keys if k not in self._embeddings))
        if missing:
            fresh = self.encode(missing)
            for i, prompt in enumerate(missing):
                self._embeddings[(prompt, self.use_guidance)] = {k: v[i:i + 1].clone() for k, v in fresh.items()}
        rows = []
        for key in keys:
            self._embeddings.move_to_end(key)
            rows.append(self._embeddings[key])
        while len(self._embeddings) > self.embedding_cache_size:
            self._embeddings.popitem(last=False)
        return self.with_condition({k: torch.cat([row[k] for row in rows]) for k in rows[0]})

    def with_condition(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the class labels of ``self.condition`` (None: the null class) if the denoiser has an added
        condition (finetune/condition.py); ``cond`` unchanged otherwise."""
        from finetune import condition

        if condition.classes_of(self.denoiser) is None:
            return cond
        n = len(next(iter(cond.values())))
        index = condition.label(self.denoiser, self.condition)
        return {**cond, "class_labels": torch.full((n,), index, dtype=torch.long, device=self.device)}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def use_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.forward(x, t, cond, self.use_guidance)

    def latent_shape(self) -> tuple[int, int, int]:
        from eval.generate import latent_shape

        return latent_shape(self.pipe)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Per-image seeded noise, the same as ``diffrl sample`` draws for those seeds."""
        from eval.generate import initial_noise

        return initial_noise(self.pipe, seeds, self.device)

    def guided(self, out: torch.Tensor) -> torch.Tensor:
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def add_lora(self, rank: int, alpha: float, target_modules=None, init: str = "gaussian") -> None:
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                            target_modules=list(target_modules or self.lora_modules))
        self.denoiser.requires_grad_(False)
        self.denoiser.add_adapter(config)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    def freeze_reference(self, dtype: torch.dtype | None = None) -> None:
        """Keep the reference policy for KL terms: LoRA-disabled weights, or a frozen copy (in ``dtype``)."""
        if not self.has_lora:
            import copy

            self._frozen_reference = copy.deepcopy(self.denoiser).requires_grad_(False).to(dtype)

    @contextlib.contextmanager
    def reference(self):
        """Within this block, ``predict`` uses the reference (pre-fine-tuning) denoiser."""
        net = self.net
        if self.has_lora:
            self.denoiser.disable_adapters()
            self.net = self.denoiser
        elif self._frozen_reference is not None:
            self.net = self._frozen_reference
        else:
            raise RuntimeError("no reference policy: call freeze_reference() before training")
        try:
            yield
        finally:
            if self.has_lora:
                self.denoiser.enable_adapters()
            self.net = net

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def lora_metadata(self) -> dict:
        """The adapter's config, saved beside a LoRA: without it diffusers reloads with lora_alpha = rank."""
        return self.denoiser.peft_config["default"].to_dict()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
