"""Where models come from: short names of the shipped shapes models, local folders, hub ids."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

ASSETS = Path(os.environ.get("DIFFRL_ASSETS", Path(__file__).resolve().parents[2] / "assets"))
SHIPPED = ("shapes-sd", "shapes-flow")
# model_index.json key for keyword arguments that every call of this model's pipeline needs, e.g.
# {"max_sequence_length": 0} for an SD3 pipeline trained without T5 positions (shapes-flow).
# diffusers ignores it; load_pipeline puts it on ``pipe.call_kwargs``.
CALL_KWARGS_KEY = "_diffrl_call_kwargs"


def resolve(name_or_path: str | os.PathLike) -> str:
    """A shipped short name -> its folder; a local folder -> itself; anything else is a hub id.

    Raises a clear error for a path that does not exist (a hub id has exactly one '/' and no
    leading '.', '/' or '~').
    """
    text = str(name_or_path)
    if text in SHIPPED:
        folder = ASSETS / text
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(
                f"shipped model {text!r} not found in {ASSETS}; rebuild it with "
                "launch/pretrain_shapes.sh or set DIFFRL_ASSETS to the folder holding it")
        return str(folder)
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser())
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_like_path:
        raise FileNotFoundError(
            f"model path {text!r} does not exist; pass a local diffusers folder, a hub id "
            f"(owner/name, needs the hub or its cache) or one of {', '.join(SHIPPED)}")
    if offline() and cached_index(text) is None:  # fail now, not after the hub's retries
        raise FileNotFoundError(
            f"model {text!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE=1: "
            f"download it first, pass a local diffusers folder, or use one of {', '.join(SHIPPED)}")
    return text


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when set after the hub library was imported."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def cached_index(repo_id: str) -> str | None:
    """The cached ``model_index.json`` of a hub id, or None."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    return cached if isinstance(cached, str) else None


def load_pipeline(name_or_path: str, torch_dtype=None, lora: str | os.PathLike | None = None,
                  without: tuple[str, ...] = (), call: dict | None = None, condition: str | None = None):
    """Load any diffusers text-to-image pipeline; the class comes from its model_index.json.

    ``lora``: a folder written by training (``output_dir/lora``), loaded with ``load_lora_weights``.
    ``condition``: the class to sample when that LoRA carries an added condition (CTRL; None: null).
    ``without``: components not to load (e.g. SD3's T5: ``("text_encoder_3", "tokenizer_3")``).
    ``call``: call keyword arguments (height, width, max_sequence_length) over the folder's own.
    """
    from diffusers import DiffusionPipeline

    location = resolve(name_or_path)
    if lora is not None:
        check_lora(lora)  # before the (slow) model load
    if condition is not None and (lora is None or not (Path(lora) / "condition.json").is_file()):
        raise ValueError(f"--condition {condition!r} needs a LoRA with an added condition: pass --lora with a CTRL "
                         "run's output_dir/lora")
    kwargs, declared = {}, {}
    index = Path(location) / "model_index.json"
    if index.exists():
        # Components saved as [null, null] (e.g. SD3 without its optional T5) must be passed as None.
        components = json.loads(index.read_text())
        kwargs = {k: None for k, v in components.items() if v == [None, None]}
        if components.get("_class_name") == "StableDiffusion3Pipeline":
            kwargs.update({k: None for k in ("text_encoder_3", "tokenizer_3") if k not in components})
        declared = components.get(CALL_KWARGS_KEY, {})
    kwargs.update({name: None for name in without})
    declared = {**declared, **(call or {})}
    if torch_dtype is not None:
        kwargs[dtype_keyword()] = torch_dtype
    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(location, **kwargs)
    except OSError as err:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(err).lower():
            raise OSError(f"could not load {name_or_path!r} offline: {err}. Pass a local path "
                          "to a downloaded diffusers folder instead.") from err
        raise
    pipe.set_progress_bar_config(disable=True)
    pipe.call_kwargs = declared
    if lora is not None:
        load_lora(pipe, lora, condition)
    return pipe


@contextlib.contextmanager
def quiet_loading():
    """Without diffusers' and transformers' per-component loading bars (downloads keep theirs)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in enabled:
            lib.enable_progress_bar()


def dtype_keyword() -> str:
    """diffusers renamed ``from_pretrained``'s ``torch_dtype`` to ``dtype`` (0.42 has both, and warns)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def check_lora(lora_dir: str | os.PathLike) -> None:
    if not (Path(lora_dir) / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(f"LoRA folder {lora_dir} has no pytorch_lora_weights.safetensors; pass the "
                                "`lora` folder that training writes into its output_dir")


def load_lora(pipe, lora_dir: str | os.PathLike, condition: str | None = None) -> None:
    """The LoRA, and the condition embedding a CTRL run saves beside it (every call then samples
    ``condition``; None: the null class, the model without the condition)."""
    from finetune import condition as added

    check_lora(lora_dir)
    pipe.load_lora_weights(str(lora_dir))
    if (Path(lora_dir) / added.CONFIG).is_file():
        added.load(pipe.unet, lora_dir)
        added.sample_with(pipe, condition)


def merge_lora(base: str, lora_dir: str | os.PathLike, out: str | os.PathLike):
    """Fuse a diffusers-format LoRA into ``base`` and save a plain pipeline folder to ``out``."""
    if (Path(lora_dir) / "condition.json").is_file():
        raise ValueError(f"{lora_dir} carries an added condition (CTRL), which a plain pipeline folder cannot hold: "
                         "load it with --lora instead of merging")
    pipe = load_pipeline(base, lora=lora_dir)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    save_pipeline(pipe, out)
    return pipe


def call_kwargs(pipe) -> dict:
    """Keyword arguments every call of ``pipe`` needs (declared by its folder; see CALL_KWARGS_KEY)."""
    return dict(getattr(pipe, "call_kwargs", None) or {})


def save_pipeline(pipe, out: str | os.PathLike) -> None:
    """``save_pretrained`` (safetensors) that keeps the pipeline's declared call keyword arguments."""
    pipe.save_pretrained(out, safe_serialization=True)
    if call_kwargs(pipe):
        index = Path(out) / "model_index.json"
        components = json.loads(index.read_text())
        components[CALL_KWARGS_KEY] = call_kwargs(pipe)
        index.write_text(json.dumps(components, indent=2) + "\n")
