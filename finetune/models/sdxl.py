"""SDXL-style pipelines: two CLIP text encoders and micro-conditioning on image size and crop.

The sampler (DDIM as a Gaussian policy) and the forward process are SD's (``SDPolicy``). What
differs is the UNet's conditioning: besides the concatenated hidden states of both text encoders
it takes the pooled (projected) embedding of the second one and six "time ids" (original size,
crop top-left, target size), as ``added_cond_kwargs`` the way StableDiffusionXLPipeline passes them.
"""

from __future__ import annotations

import contextlib

import torch

from finetune.models.sd import SDPolicy

# The unconditional (negative) counterpart of each conditioning tensor, for classifier-free guidance.
NEGATIVE = {"embeds": "neg", "pooled": "neg_pooled", "time_ids": "neg_time_ids"}


class SDXLPolicy(SDPolicy):
    """StableDiffusionXLPipeline: the pipeline's default conditioning, DDIM steps."""

    def text_encoders(self):
        return [e for e in (self.pipe.text_encoder, self.pipe.text_encoder_2) if e is not None]

    @torch.no_grad()
    def encode(self, prompts):
        """Embeddings, pooled embeddings and time ids per prompt; with guidance also the negative ones.

        The negative prompt is the empty one, which ``encode_prompt`` turns into zeros when the
        pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL base), exactly as a pipeline call does.
        """
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=self.use_guidance)
        time_ids = self.time_ids(pooled, embeds.dtype).repeat(len(embeds), 1)
        cond = {"embeds": embeds, "pooled": pooled, "time_ids": time_ids}
        if self.use_guidance:
            cond.update(neg=neg, neg_pooled=neg_pooled, neg_time_ids=time_ids.clone())
        return cond

    def time_ids(self, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(1, 6): the pipeline's defaults, original and target size the image size of our latents, no crop."""
        from eval.generate import sample_pixels

        size = sample_pixels(self.pipe)
        encoder = self.pipe.text_encoder_2
        projection = encoder.config.projection_dim if encoder is not None else int(pooled.shape[-1])
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection)
        return ids.to(self.device)

    def forward(self, x, t, cond, guidance):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))
        if guidance:  # unconditional half first, as the pipeline (and ``guided``) expects
            x, t = torch.cat([x, x]), torch.cat([t, t])
            inputs = {name: torch.cat([cond[neg], cond[name]]) for name, neg in NEGATIVE.items()}
        else:
            inputs = {name: cond[name] for name in NEGATIVE}
        out = self.net(x, t, inputs["embeds"],
                       added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}).sample
        return self.guided(out) if guidance else out

    def scale_latents(self, raw):
        vae = self.pipe.vae
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is None or std is None:
            return raw * vae.config.scaling_factor
        mean, std = (torch.tensor(v, device=raw.device).reshape(1, -1, 1, 1) for v in (mean, std))
        return (raw - mean) * vae.config.scaling_factor / std

    def latents_to_images(self, latents):
        """Decode as the pipeline does: an fp16 VAE marked ``force_upcast`` (SDXL's overflows in fp16)
        decodes in fp32, also under autocast; optional per-channel latent mean and std."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            mean, std = (torch.tensor(v, device=latents.device).reshape(1, -1, 1, 1) for v in (mean, std))
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        if upcast:  # .float() / .half(): the same casts as .to(dtype), without its warning on every call
            vae.float()
        try:
            no_autocast = torch.autocast(latents.device.type, enabled=False) if upcast else contextlib.nullcontext()
            with no_autocast:
                images = vae.decode(latents.to(vae.dtype)).sample
        finally:
            if upcast:
                vae.half()
        return (images.float() / 2 + 0.5).clamp(0, 1)
