"""Shared plumbing of the model-based rewards (PickScore, CLIPScore, aesthetic, HPS, ImageReward).

``ModelReward`` loads its model on the first call (building a reward in a config costs nothing, and
a run that never scores never loads), puts it on one device and dtype once, and scores in chunks of
``batch_size``. ``CLIPReward`` adds a transformers ``CLIPModel`` + processor loaded with
``from_pretrained`` from a hub id, a local folder or the short name of a CLIP shipped in ``assets/``
(``shapes-clip``, built by ``launch/train_shapes_clip.py``). Nothing here passes ``trust_remote_code``.

Hub ids only work where the model is already in the Hugging Face cache or the hub is reachable;
offline (``HF_HUB_OFFLINE=1``) a missing one fails with a message asking for a local path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewards.base import Reward, RewardOutput, to_pil

SHIPPED_CLIP = ("shapes-clip",)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    # current_device() so that each accelerate process scores on its own GPU.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_shipped(source: str) -> str:
    """The folder of a shipped CLIP for its short name (``shapes-clip``); any other source unchanged."""
    if source not in SHIPPED_CLIP:
        return source
    from finetune.models.hub import ASSETS

    folder = ASSETS / source
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"shipped CLIP {source!r} not found in {ASSETS}; rebuild it with "
                                "launch/train_shapes_clip.py or set DIFFRL_ASSETS to the folder holding it")
    return str(folder)


def looks_like_path(source: str) -> bool:
    """True for strings that cannot be a hub id ("org/name"), so a missing one is a missing path."""
    return (source.startswith(("/", ".", "~")) or source.count("/") > 1
            or Path(source).suffix in {".pt", ".pth", ".bin", ".safetensors", ".json"})


def check_source(source: str, what: str) -> None:
    """Fail early (at build time, not after the first rollout) on a local path that does not exist."""
    if looks_like_path(source) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"{what}: no such file or folder {source!r}")


def from_pretrained(loader, source: str, what: str):
    """``loader(source)`` for a local folder or a hub id, with a clear error when neither works."""
    path = Path(source).expanduser()
    if path.exists():
        return loader(str(path))
    check_source(source, what)
    try:
        return loader(source)
    except (OSError, ValueError) as error:  # transformers raises OSError for "not found / not cached"
        raise OSError(f"{what}: {source!r} is not a local folder and could not be loaded from the Hugging Face "
                      "hub (offline, HF_HUB_OFFLINE=1, or not cached); pass a local path to a folder saved "
                      f"with save_pretrained instead. Cause: {error}") from error


def local_file(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what}: pass a local path to the file")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}; pass a local path to the file")
    return file


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle, never executing pickled code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints (HPS) wrap the weights as {"state_dict": ...}.
    return state.get("state_dict", state) if isinstance(state, dict) else state


def pooled(out) -> torch.Tensor:
    # transformers < 5 returns the projected embedding; >= 5 a BaseModelOutputWithPooling holding it.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class ModelReward(Reward):
    """A reward backed by a model: lazy loading, one device/dtype, batched scoring.

    Subclasses implement ``_load()`` (set attributes, put the model on ``self.device``/``self.dtype``)
    and ``_score(images, prompts) -> (scores, info)`` for one chunk of at most ``batch_size`` images.
    """

    def __init__(self, batch_size: int = 16, device=None, dtype=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self._loaded = False

    def _load(self) -> None:
        raise NotImplementedError

    def _score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, images, prompts, metadata):
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        if not self._loaded:
            self._load()
            self._loaded = True
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                chunks.append(self._score(images[i:i + self.batch_size], list(prompts[i:i + self.batch_size])))
        if not chunks:
            return RewardOutput(torch.zeros(0))
        scores = torch.cat([s for s, _ in chunks]).float().cpu()
        info = {k: torch.cat([c[k] for _, c in chunks]).float().cpu() for k in chunks[0][1]}
        return RewardOutput(scores, info)


class CLIPReward(ModelReward):
    """A ``CLIPModel`` and its processor, from hub ids, local folders or ``shapes-clip`` (``processor``
    defaults to ``model``; ``shapes-clip`` always brings its own unless given a local processor folder)."""

    def __init__(self, model: str, processor: str | None = None, batch_size: int = 16, device=None, dtype=None,
                 max_length: int = 77):
        super().__init__(batch_size, device, dtype)
        if model in SHIPPED_CLIP and not (processor and Path(processor).expanduser().exists()):
            processor = model  # its tokenizer is its own: no hub processor (PickScore's default) fits it
        self.model_source = resolve_shipped(model)
        self.processor_source = resolve_shipped(processor) if processor else self.model_source
        self.max_length = max_length
        check_source(self.model_source, f"{self.name} model")
        check_source(self.processor_source, f"{self.name} processor")

    def _load(self) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.processor = from_pretrained(AutoProcessor.from_pretrained, self.processor_source, f"{self.name} processor")
        model = from_pretrained(CLIPModel.from_pretrained, self.model_source, f"{self.name} model")
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        # Through PIL, as the published scorers do, so that resizing and normalisation match theirs.
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        return normalize(pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float())

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return normalize(pooled(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device))).float())
