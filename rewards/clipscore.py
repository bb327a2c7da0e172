"""CLIPScore (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning"):

    score = w * max(cos(image_embeds, text_embeds), 0)

with L2-normalised CLIP embeddings and ``w = 2.5`` as in the paper (it stretches the usual cosine
range to about [0, 1]). ``scale=100`` gives the other common convention, ``100 * max(cos, 0)``
(torchmetrics' ``CLIPScore``). The paper prefixes each caption with "A photo depicts"; pass
``prefix="A photo depicts "`` to reproduce that, by default the prompt is scored as it is. The default
model is ``openai/clip-vit-large-patch14`` (the paper used ViT-B/32); any hub id or local folder works.
"""

from __future__ import annotations

from rewards.base import register
from rewards.clip_common import CLIPReward


@register("clipscore")
class CLIPScore(CLIPReward):
    """CLIPScore: 2.5 x max(cos(image, prompt), 0) with CLIP (Hessel et al. 2021)."""

    needs = "weights: openai/clip-vit-large-patch14 (model=)"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 scale: float = 2.5, prefix: str = "", batch_size: int = 16, device=None, dtype=None):
        super().__init__(model, processor, batch_size, device, dtype)
        self.scale, self.prefix = float(scale), prefix

    def _score(self, images, prompts):
        cos = (self.image_embeds(images) * self.text_embeds([self.prefix + p for p in prompts])).sum(-1)
        return self.scale * cos.clamp(min=0), {"clip_cos": cos}
