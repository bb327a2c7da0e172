"""Sample a text-to-image pipeline into GenEval's folder layout with deterministic per-image seeds.

Image ``j`` of prompt ``i`` always starts from the noise of seed ``image_seed(seed, i, j)``, whatever
the batch size or process count, so before/after comparisons share their initial noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from eval.layout import write_prompt
from finetune.models.hub import call_kwargs

# Sampler settings of the shipped shapes models (documented in README).
SHAPES_SAMPLER = {"num_inference_steps": 20, "guidance_scale": 4.0}


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return seed * 1_000_003 + prompt_index * 1_000 + image_index


def packs_latents(pipe) -> bool:
    """FLUX-style pipelines take latents packed into 2x2 patches, (B, H/2 * W/2, 4C)."""
    return hasattr(pipe, "_pack_latents")


def sample_pixels(pipe) -> tuple[int, int]:
    """(height, width) in pixels of the pipeline's samples: the folder's (or ``model.resolution``'s)
    declared call keyword arguments, else the denoiser's native sample size."""
    if hasattr(pipe, "default_sample_size"):
        default = pipe.default_sample_size * pipe.vae_scale_factor
    else:
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    declared = call_kwargs(pipe)
    return declared.get("height", default), declared.get("width", default)


def _unpacked_shape(pipe) -> tuple[int, int, int]:
    # As FluxPipeline.prepare_latents: the latent grid is rounded down to whole 2x2 patches.
    height, width = sample_pixels(pipe)
    scale = pipe.vae_scale_factor * 2
    return pipe.transformer.config.in_channels // 4, 2 * (height // scale), 2 * (width // scale)


def latent_shape(pipe) -> tuple[int, ...]:
    """One sample's initial latent: (C, H, W), or (H/2 * W/2, 4C) for a packed-latent pipeline."""
    if packs_latents(pipe):
        channels, height, width = _unpacked_shape(pipe)
        return (height // 2) * (width // 2), channels * 4
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    height, width = sample_pixels(pipe)
    return denoiser.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor


def initial_noise(pipe, seeds: list[int], device=None) -> torch.Tensor:
    """One seeded CPU generator per image, so an image's noise does not depend on its batch or device.

    Packed latents are drawn as FluxPipeline.prepare_latents draws them (unpacked, then packed), so
    ``pipe(generator=...)`` with the same seeds starts from the same noise.
    """
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    if not packs_latents(pipe):
        return randn_tensor((len(seeds), *latent_shape(pipe)), generator=generators, device=device)
    shape = _unpacked_shape(pipe)
    noise = randn_tensor((len(seeds), *shape), generator=generators, device=device)
    return pipe._pack_latents(noise, len(seeds), *shape)


def seeded_starts(pipe, noise_policy=None):
    """(seeds, prompts) -> x_T: each seed's noise, moved into its learned x_T if a noise policy is given."""
    if noise_policy is None:
        return lambda seeds, prompts: initial_noise(pipe, seeds)
    from finetune.models import wrap_pipeline

    encoder = wrap_pipeline(pipe, guidance_scale=1.0)  # the prompt embeddings the noise policy reads
    return lambda seeds, prompts: noise_policy.initial_latents(encoder.encode(prompts),
                                                               initial_noise(pipe, seeds).to(pipe.device))


def generate(pipe, records: list[dict], out: str | Path, images_per_prompt: int = 4, seed: int = 0,
             batch_size: int = 32, progress: bool = True, prompt_indices: list[int] | None = None,
             noise_policy=None, on_image=None, **sampler) -> None:
    """Write ``images_per_prompt`` samples of every record to ``out`` (GenEval layout).

    ``on_image(i, j, image)`` sees each image as it is made (scoring it there saves reading it back).
    ``prompt_indices`` restricts the work to some prompts (a process's shard); seeds and folder
    names still follow the prompt's index in ``records``. ``noise_policy`` (a trained
    ``finetune.noise_policy.NoisePolicy``) moves each image's seeded noise into its learned x_T.
    """
    starts = seeded_starts(pipe, noise_policy)
    sampler = {**SHAPES_SAMPLER, **call_kwargs(pipe), **sampler}
    indices = range(len(records)) if prompt_indices is None else prompt_indices
    jobs = [(i, j) for i in indices for j in range(images_per_prompt)]
    images: dict[int, list] = {i: [] for i in indices}
    bar = tqdm(total=len(jobs), desc="sampling", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        prompts = [records[i]["prompt"] for i, _ in chunk]
        latents = starts([image_seed(seed, i, j) for i, j in chunk], prompts)
        result = pipe(prompt=prompts, latents=latents.to(pipe.device, pipe.dtype), **sampler)
        for (i, j), image in zip(chunk, result.images):
            if on_image is not None:
                on_image(i, j, image)
            images[i].append(image)
            if len(images[i]) == images_per_prompt:
                write_prompt(out, i, records[i], images.pop(i))
        bar.update(len(chunk))
    bar.close()
