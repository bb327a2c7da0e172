"""Model adapters: one ``Policy`` interface over epsilon (SD) and rectified-flow (SD3) pipelines."""

from __future__ import annotations

from finetune.models.base import Policy

# SDXL (two text encoders, micro-conditioning) and FLUX (packed latents) are not wired in yet.
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusion3Pipeline": "flow"}


def load_policy(model: str, guidance_scale: float = 4.0, num_steps: int = 20, noise: float | None = None,
                torch_dtype=None) -> Policy:
    """Load ``model`` (shipped name, local folder or hub id) and wrap it in its family's policy."""
    from finetune.models.hub import load_pipeline

    return wrap_pipeline(load_pipeline(model, torch_dtype=torch_dtype), guidance_scale, num_steps, noise)


def wrap_pipeline(pipe, guidance_scale: float = 4.0, num_steps: int = 20, noise: float | None = None) -> Policy:
    from finetune.models.flow import FlowPolicy
    from finetune.models.sd import SDPolicy

    family = FAMILIES.get(type(pipe).__name__)
    if family == "sd":
        return SDPolicy(pipe, guidance_scale, num_steps, 1.0 if noise is None else noise)
    if family == "flow":
        return FlowPolicy(pipe, guidance_scale, num_steps, 0.7 if noise is None else noise)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported: {', '.join(FAMILIES)}")
