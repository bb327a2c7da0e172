"""Expert demonstrations (prompt, image) through Hugging Face ``datasets``, encoded to latents once.

``data.expert`` names the set:

* ``shapes:train``: the shapes world's ground-truth renders of its train split (the embedded default;
  ``diffrl shapes dataset --split train --out DIR`` writes the same set to disk);
* a local folder: a dataset saved with ``save_to_disk``, a folder of parquet files, or an
  imagefolder (images plus a ``metadata.jsonl`` / ``metadata.csv`` naming each ``file_name``'s prompt);
* a hub id (``load_dataset(id, split="train")``; offline it must be in the local cache).

Each row needs a ``prompt`` (text) and an ``image`` column. The set is checked before any model
loads; its images are encoded by the policy's VAE once and cached, in memory and in
``output_dir/expert_latents.safetensors``. x0 is the VAE posterior's mean: the official DRO code
draws from the posterior, but SD's posterior std is ~1e-3 of its latents' spread, so that draw is
the mean in effect; the shapes VAE's std is not small (0.56 against a spread of 0.71), and its
denoisers were trained on the means.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import torch

COLUMNS = ("prompt", "image")


def shapes_dataset(split: str = "train", images_per_prompt: int = 4, seed: int = 0):
    """The shapes world's renders of a prompt split as a ``datasets.Dataset`` (prompt, image, tag)."""
    from datasets import Dataset, Features, Image, Value

    from eval.shapes.grammar import split as prompt_split
    from eval.shapes.render import render

    rows = {"prompt": [], "image": [], "tag": []}
    for i, record in enumerate(prompt_split(split)):
        for j in range(images_per_prompt):
            rows["prompt"].append(record["prompt"])
            rows["image"].append(render(record, seed=seed * 1_000_003 + i * 1_000 + j)[0])
            rows["tag"].append(record["tag"])
    features = Features({"prompt": Value("string"), "image": Image(), "tag": Value("string")})
    return Dataset.from_dict(rows, features=features)


def load_expert(source: str, field: str = "data.expert"):
    """The dataset ``source`` names (see the module docstring), its columns not yet checked."""
    import datasets

    source = str(source)
    if source.startswith("shapes:"):
        return shapes_dataset(source.split(":", 1)[1])
    path = Path(source)
    try:
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "state.json").exists():
                return datasets.load_from_disk(str(path))
            parquet = sorted(str(p) for p in path.rglob("*.parquet"))
            if parquet:
                return datasets.load_dataset("parquet", data_files=parquet, split="train")
            return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        if path.suffix == ".parquet" and path.is_file():
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        if path.exists() or source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{source} is not a dataset folder or a .parquet file")
        return datasets.load_dataset(source, split="train")
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise ValueError(
            f"config field `{field}`: cannot load the expert dataset {source!r}: {err}. Give shapes:train, a folder "
            "written by `Dataset.save_to_disk`, a folder of parquet files, an imagefolder (images plus "
            "metadata.jsonl with file_name and prompt), or a hub id that is in the local cache") from None


def check_expert(dataset, field: str = "data.expert", min_rows: int = 1, eval_prompts: list[str] = ()) -> None:
    """Refuse a set the objectives cannot train on, naming the problem and the fix."""
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"config field `{field}`: the expert dataset has no {' or '.join(repr(c) for c in missing)} column "
            f"(it has {dataset.column_names}); rename its columns to 'prompt' and 'image' "
            "(`dataset.rename_column`, or the prompt field of an imagefolder's metadata.jsonl)")
    if len(dataset) < min_rows:
        raise ValueError(f"config field `{field}`: the expert dataset has {len(dataset)} rows, fewer than one "
                         f"training batch ({min_rows}); add demonstrations or lower train.batch_size")
    prompts = dataset["prompt"]
    empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if empty:
        raise ValueError(f"config field `{field}`: rows {empty[:5]} of the expert dataset have no prompt "
                         f"({len(empty)} rows in all); fill or drop them (`dataset.filter`)")
    leaked = sorted(set(prompts) & set(eval_prompts))
    if leaked:
        raise ValueError(f"config field `{field}`: {len(leaked)} expert prompts are eval prompts (e.g. "
                         f"{leaked[0]!r}); demonstrations of the eval split would inflate its score. Drop them "
                         "from the dataset or evaluate on other prompts (prompts.eval)")


def open_image(value):
    """A row's image: PIL already, or what parquet files written without ``datasets`` hold
    (``{"bytes": ..., "path": ...}``, raw bytes, or a file path)."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    raise TypeError(f"not an image: {type(value).__name__}")


def pixels(image, size: tuple[int, int]) -> torch.Tensor:
    """An image, centre-cropped to the aspect of ``size`` (h, w) and resized: (3, h, w) in [-1, 1]."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    image = open_image(image).convert("RGB")
    h, w = size
    scale = max(h / image.height, w / image.width)
    image = resize(image, [max(h, round(image.height * scale)), max(w, round(image.width * scale))],
                   interpolation=Image.Resampling.BICUBIC) if (image.height, image.width) != (h, w) else image
    return pil_to_tensor(center_crop(image, [h, w])).float() / 127.5 - 1


class ExpertSet:
    """The checked dataset, and (after ``encode``) its VAE latent distributions, one row per example."""

    def __init__(self, dataset, source: str):
        self.dataset, self.source = dataset, source
        self.prompts: list[str] = list(dataset["prompt"])
        self.tags: list[str] | None = list(dataset["tag"]) if "tag" in dataset.column_names else None
        self.mean: torch.Tensor | None = None  # (N, C, h, w) unscaled VAE posterior means

    def __len__(self) -> int:
        return len(self.prompts)

    def cache_key(self, policy) -> str:
        from eval.generate import sample_pixels

        fingerprint = getattr(self.dataset, "_fingerprint", None) or self.source
        size = sample_pixels(policy.pipe)
        vae = policy.pipe.vae.config
        return hashlib.sha256(repr((fingerprint, len(self), size, dict(vae))).encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode(self, policy, cache: Path | None = None, batch_size: int = 32) -> None:
        """VAE posterior mean of every image (unscaled latents), from ``cache`` when it matches."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from eval.generate import sample_pixels

        key = self.cache_key(policy)
        if cache is not None and cache.exists():
            with safe_open(cache, "pt") as f:
                cached = (f.metadata() or {}).get("key") == key
            if cached:
                self.mean = load_file(cache)["mean"]
                return
        vae, size = policy.pipe.vae, sample_pixels(policy.pipe)
        means = []
        for start in range(0, len(self), batch_size):
            batch = []
            for i in range(start, min(start + batch_size, len(self))):
                try:
                    batch.append(pixels(self.dataset[i]["image"], size))
                except Exception as err:  # a corrupt file surfaces when the row is decoded
                    raise ValueError(f"expert dataset {self.source}: row {i} ({self.prompts[i]!r}) has an unreadable "
                                     f"image: {err}; fix or drop that row") from None
            posterior = vae.encode(torch.stack(batch).to(vae.device, vae.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
        self.mean = torch.cat(means).contiguous()
        if cache is not None:  # atomically: other processes encoding the same set read all or nothing
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
            save_file({"mean": self.mean}, partial, metadata={"key": key})
            os.replace(partial, cache)

    def draw(self, n: int, rng: random.Random, balance_tags: bool = False) -> list[int]:
        """n row indices, uniformly; with ``balance_tags`` a tag uniformly, then one of its rows."""
        if not (balance_tags and self.tags):
            return [rng.randrange(len(self)) for _ in range(n)]
        by_tag: dict[str, list[int]] = {}
        for i, tag in enumerate(self.tags):
            by_tag.setdefault(tag, []).append(i)
        return [rng.choice(by_tag[rng.choice(sorted(by_tag))]) for _ in range(n)]

    def latents(self, policy, index: list[int]) -> torch.Tensor:
        """The rows' latents x0 in the denoiser's latent space."""
        return policy.scale_latents(self.mean[index].to(policy.device))


def prepare_expert(cfg, min_rows: int, eval_prompts: list[dict]) -> ExpertSet:
    """Load and check ``data.expert`` (before any model loads)."""
    source = cfg.get("data", {}).get("expert") or "shapes:train"
    dataset = load_expert(source)
    check_expert(dataset, min_rows=min_rows, eval_prompts=[r["prompt"] for r in eval_prompts])
    return ExpertSet(dataset, str(source))
