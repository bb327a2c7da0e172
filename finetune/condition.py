"""A condition the base model does not have: one learned embedding per class, added to the UNet's
timestep embedding (CTRL, ``objective.name: ctrl``).

As in CTRL's official code, the embedding is the UNet's own ``class_embedding`` slot (diffusers adds
``class_embedding(class_labels)`` to the timestep embedding), zero-initialised, with a last "null"
row that stays zero: with the null class, or before any training, the model computes exactly what
the base model computes. Classifier-free guidance pairs the null class with the empty prompt.

A trained condition is saved beside the run's LoRA (``condition.safetensors`` + ``condition.json``),
so ``--lora DIR`` brings it along and ``--condition NAME`` picks the class to sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS, CONFIG = "condition.safetensors", "condition.json"
NULL = "null"


def attach(unet, classes: list[str]) -> nn.Embedding:
    """Give ``unet`` a zero-initialised embedding for ``classes`` plus the null class (the last row)."""
    if getattr(unet, "class_embedding", None) is not None:
        raise ValueError("this UNet already has a class embedding; CTRL adds a condition to a text-only model")
    width = unet.time_embedding.linear_2.out_features
    embedding = nn.Embedding(len(classes) + 1, width).to(unet.device)
    nn.init.zeros_(embedding.weight)
    unet.class_embedding = embedding
    unet.condition_classes = list(classes)
    return embedding


def classes_of(unet) -> list[str] | None:
    return getattr(unet, "condition_classes", None)


def label(unet, name: str | None) -> int:
    """The class index of ``name`` (None or "null": the null class)."""
    classes = classes_of(unet)
    if name is None or name == NULL:
        return len(classes)
    if name not in classes:
        raise ValueError(f"--condition {name!r} is not one of this model's classes: {', '.join(classes)} (or null)")
    return classes.index(name)


def keep_null_row_zero(unet) -> None:
    """Zero the null row's gradient (after backward), so it stays the base model's 'no condition'."""
    weight = unet.class_embedding.weight
    if weight.grad is not None:
        weight.grad[-1] = 0


def save(unet, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": unet.class_embedding.weight.detach().float().cpu().contiguous()}, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps({"classes": classes_of(unet), "null": NULL}, indent=1) + "\n")


def load(unet, folder: str | Path) -> bool:
    """Attach the condition saved in ``folder``, if there is one; whether it was there."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        return False
    embedding = attach(unet, json.loads((folder / CONFIG).read_text())["classes"])
    with torch.no_grad():
        embedding.weight.copy_(load_file(folder / WEIGHTS)["weight"])
    embedding.to(unet.dtype)
    return True


def sample_with(pipe, name: str | None):
    """Make every call of ``pipe`` sample class ``name``: a forward pre-hook on its UNet passes the
    class labels (null for the unconditional half of a classifier-free-guided batch). Returns the hook."""
    unet = pipe.unet
    if getattr(pipe, "condition_hook", None) is not None:
        pipe.condition_hook.remove()
    if classes_of(unet) is None:
        raise ValueError("--condition needs a model with a trained condition: pass --lora with a CTRL run's "
                         "output_dir/lora")
    index, null = label(unet, name), len(classes_of(unet))

    def hook(module, args, kwargs):
        n = len(args[0] if args else kwargs["sample"])
        labels = torch.full((n,), index, device=unet.device)
        if getattr(pipe, "do_classifier_free_guidance", False):
            labels[: n // 2] = null  # diffusers stacks [unconditional, conditional]
        return args, {**kwargs, "class_labels": labels}

    pipe.condition_hook = unet.register_forward_pre_hook(hook, with_kwargs=True)
    return pipe.condition_hook
