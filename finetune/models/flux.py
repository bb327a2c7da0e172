"""FLUX.1 (Black Forest Labs; diffusers ``FluxPipeline``): a rectified-flow MMDiT with packed latents.

The SDE / CPS steps and their log-probs are FlowPolicy's (Flow-GRPO, Liu et al., 2025, trains
FLUX.1-dev the same way as SD3). What differs from SD3:

* Latents are **packed**: the (B, C, H, W) VAE latent is cut into 2x2 patches, (B, H/2 * W/2, 4C).
  They stay packed everywhere (rollouts, objectives); every step and loss is elementwise plus a mean
  over the non-batch dims, so it is the same number on packed or unpacked latents. Only
  ``latents_to_images`` unpacks (with the pipeline's own ``_unpack_latents``).
* FLUX.1-dev is guidance-distilled: ``guidance_scale`` is fed to the transformer's ``guidance``
  embedding and there is no classifier-free guidance (``use_guidance`` is always False, one forward
  pass per step). FLUX.1-schnell has no guidance embedding and ignores the value.
* The timestep schedule depends on the resolution: sigmas = linspace(1, 1/n, n), shifted by
  mu = calculate_shift(number of latent patches), exactly as ``FluxPipeline.__call__`` sets it.
* The transformer takes time in [0, 1] (the pipeline divides the scheduler's timestep by 1000), plus
  RoPE position ids of the text (zeros) and of the latent patches (row, column), which are not batched
  and so are rebuilt in ``forward`` instead of being stored in the conditioning dict.
"""

from __future__ import annotations

import numpy as np
import torch

from finetune.models.flow import FlowPolicy
from finetune.models.hub import call_kwargs


class FluxPolicy(FlowPolicy):
    """FluxPipeline-style model: packed latents, embedded (distilled) guidance, shifted schedule."""

    # Flow-GRPO's FLUX LoRA targets (yifan123/flow_grpo, scripts/train_flux.py): attention and MLPs of
    # the double-stream blocks. In the single-stream blocks only attn.to_q/k/v match (their output
    # and MLP are the fused proj_mlp / proj_out, which the reference leaves untouched).
    lora_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")

    def __init__(self, pipe, guidance_scale: float = 3.5, num_steps: int = 28, noise_level: float = 0.7):
        from eval.generate import sample_pixels

        super().__init__(pipe, guidance_scale, num_steps, noise_level)
        self.max_sequence_length = call_kwargs(pipe).get("max_sequence_length", 512)  # FluxPipeline's default
        self.height, self.width = sample_pixels(pipe)

    @property
    def use_guidance(self) -> bool:
        # Guidance-distilled: guidance_scale is an input of the transformer, never a second (CFG) pass.
        return False

    def text_encoders(self):
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    @property
    def latent_grid(self) -> tuple[int, int]:
        """(rows, columns) of 2x2 latent patches: the packed sequence is rows * columns long."""
        scale = self.pipe.vae_scale_factor * 2
        return self.height // scale, self.width // scale

    @torch.no_grad()
    def encode(self, prompts):
        prompts = list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"embeds": embeds, "pooled": pooled}

    def forward(self, x, t, cond, guidance):
        if guidance:
            raise ValueError("FLUX is guidance-distilled: guidance_scale goes into the transformer, not CFG")
        n, embeds = len(x), cond["embeds"]
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1).expand(n)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype)
        img_ids = self.pipe._prepare_latent_image_ids(n, *self.latent_grid, x.device, embeds.dtype)
        embedded = None
        if self.denoiser.config.guidance_embeds:
            embedded = torch.full((n,), float(self.guidance_scale), device=x.device, dtype=torch.float32)
        return self.net(hidden_states=x, timestep=t / 1000, guidance=embedded, pooled_projections=cond["pooled"],
                        encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def mu(self) -> float:
        """FLUX's resolution-dependent time shift for this policy's image size."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        rows, cols = self.latent_grid
        config = self.pipe.scheduler.config
        return calculate_shift(rows * cols, config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15))

    def timesteps(self):
        """The schedule ``FluxPipeline.__call__`` uses for ``num_steps`` at this resolution."""
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        n, scheduler = self.num_steps, self.pipe.scheduler
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        timesteps, _ = retrieve_timesteps(scheduler, n, self.device, sigmas=sigmas, mu=self.mu())
        return timesteps

    def scale_latents(self, raw):
        scaled = super().scale_latents(raw)
        return self.pipe._pack_latents(scaled, *scaled.shape)

    def latents_to_images(self, latents):
        unpacked = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        return super().latents_to_images(unpacked)
