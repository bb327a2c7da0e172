"""Model adapters: one ``Policy`` interface over UNet (SD, SDXL) and rectified-flow (SD3) pipelines."""

from __future__ import annotations

from finetune.models.base import Policy

# Pipeline class -> family: "sd" is a UNet with DDIM steps (SD 1.x/2.x, SDXL), "flow" a rectified flow.
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sd", "StableDiffusion3Pipeline": "flow",
            "FluxPipeline": "flow"}


def load_policy(model: str, guidance_scale: float = 4.0, num_steps: int = 20, noise: float | None = None,
                torch_dtype=None, resolution: int | None = None, text_encoder_3: bool = True,
                max_sequence_length: int | None = None) -> Policy:
    """Load ``model`` (shipped name, local folder or hub id) and wrap it in its family's policy.

    ``resolution`` (square, pixels) and ``max_sequence_length`` override the model's own call
    settings; ``text_encoder_3=False`` leaves SD3's T5 unloaded (about 10 GB in bf16).
    """
    from finetune.models.hub import load_pipeline

    call = {"height": resolution, "width": resolution} if resolution else {}
    if max_sequence_length is not None:
        call["max_sequence_length"] = max_sequence_length
    without = () if text_encoder_3 else ("text_encoder_3", "tokenizer_3")
    pipe = load_pipeline(model, torch_dtype=torch_dtype, without=without, call=call)
    return wrap_pipeline(pipe, guidance_scale, num_steps, noise)


def peek_family(model: str) -> str | None:
    """The model's family from its ``model_index.json``, read before anything loads.

    A missing local path raises at once (``resolve``). A hub id is looked up in the local Hugging
    Face cache; offline (``HF_HUB_OFFLINE=1``) one that is not there is an error now rather than after
    the hub's retries. None when the answer needs a download.
    """
    import json
    from pathlib import Path

    from finetune.models.hub import cached_index, resolve

    location = resolve(model)
    index = Path(location) / "model_index.json"
    if Path(location).is_dir():
        if not index.is_file():
            raise FileNotFoundError(f"model.path {model!r}: {location} has no model_index.json; "
                                    "pass a diffusers pipeline folder (save_pretrained writes one)")
    else:
        cached = cached_index(location)  # offline, resolve has already refused a hub id that is not cached
        if cached is None:
            return None
        index = Path(cached)
    name = json.loads(index.read_text()).get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"model.path {model!r} is a {name}; supported pipelines: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def wrap_pipeline(pipe, guidance_scale: float = 4.0, num_steps: int = 20, noise: float | None = None) -> Policy:
    from finetune.models.flow import FlowPolicy
    from finetune.models.flux import FluxPolicy
    from finetune.models.sd import SDPolicy
    from finetune.models.sdxl import SDXLPolicy

    family = FAMILIES.get(type(pipe).__name__)
    if family == "sd":
        cls = SDXLPolicy if type(pipe).__name__ == "StableDiffusionXLPipeline" else SDPolicy
        return cls(pipe, guidance_scale, num_steps, 1.0 if noise is None else noise)
    if family == "flow":
        cls = FluxPolicy if type(pipe).__name__ == "FluxPipeline" else FlowPolicy
        return cls(pipe, guidance_scale, num_steps, 0.7 if noise is None else noise)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported: {', '.join(FAMILIES)}")
