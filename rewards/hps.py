"""HPSv2 / HPSv2.1 (Wu et al., 2023, "Human Preference Score v2: A Solid Benchmark for Evaluating
Human Preferences of Text-to-Image Synthesis"): an open_clip ViT-H/14 fine-tuned on HPD v2.

    score = scale * cos(image_embeds, text_embeds)

with both embeddings L2-normalised. ``scale=1`` (default) is what the ``hpsv2`` package's ``score``
returns (about 0.25-0.30); the HPS papers' tables report ``100 * cos``: pass ``scale=100`` for that.

``checkpoint``: local ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` (a ``{"state_dict": ...}``
torch file, read with ``weights_only=True``) or a ``.safetensors`` file. The architecture is built
from open_clip's config ``arch`` with no pretrained weights, so nothing is downloaded.
open_clip is optional and imported on first use only (``pip install open-clip-torch``).

Tested in tests/test_rewards_adapters.py on a tiny open_clip model built from a config (when
open-clip-torch is installed), and on a monkeypatched ``build_open_clip`` that always runs.
"""

from __future__ import annotations

import torch

from rewards.base import register, to_pil
from rewards.clip_common import ModelReward, load_state_dict, local_file, normalize


def import_open_clip():
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("the hps reward needs open_clip: pip install open-clip-torch") from error
    return open_clip


def build_open_clip(arch: str):
    """(model, preprocess, tokenizer) for an open_clip architecture, randomly initialised."""
    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    return model, preprocess, open_clip.get_tokenizer(arch)


@register("hps")
class HPSv2(ModelReward):
    """HPSv2 / HPSv2.1 human-preference score (open_clip ViT-H-14)."""

    needs = "open-clip-torch ([rewards] extra) and the HPS checkpoint (checkpoint=)"

    def __init__(self, checkpoint: str | None = None, arch: str = "ViT-H-14", scale: float = 1.0,
                 batch_size: int = 16, device=None, dtype=None):
        super().__init__(batch_size, device, dtype)
        self.checkpoint = local_file(checkpoint, "hps checkpoint (HPS_v2.1_compressed.pt)")
        self.arch, self.scale = arch, float(scale)

    def _load(self):
        model, self.preprocess, self.tokenizer = build_open_clip(self.arch)
        model.load_state_dict(load_state_dict(self.checkpoint))
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)

    def _score(self, images, prompts):
        pixels = torch.stack([self.preprocess(image) for image in to_pil(images)]).to(self.device, self.dtype)
        tokens = self.tokenizer(prompts).to(self.device)
        cos = (normalize(self.model.encode_image(pixels).float()) * normalize(self.model.encode_text(tokens).float())).sum(-1)
        return self.scale * cos, {"hps_cos": cos}
