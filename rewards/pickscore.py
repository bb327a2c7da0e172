"""PickScore (Kirstain et al., 2023, "Pick-a-Pic: An Open Dataset of User Preferences for
Text-to-Image Generation"): a CLIP ViT-H/14 fine-tuned on human preferences.

    score = exp(logit_scale) * cos(image_embeds, text_embeds)

with ``image_embeds = CLIPModel.get_image_features``, ``text_embeds = get_text_features``, both
L2-normalised (exp(logit_scale) = 100 for the released model, so scores lie around 20-23).
``model`` and ``processor`` take hub ids or local folders saved with ``save_pretrained``.
"""

from __future__ import annotations

from rewards.base import register
from rewards.clip_common import CLIPReward


@register("pickscore")
class PickScore(CLIPReward):
    """PickScore: CLIP ViT-H preference score (Kirstain et al. 2023); model=shapes-clip on the shapes world."""

    needs = "weights: yuvalkirstain/PickScore_v1 + the CLIP-ViT-H-14 processor, or the shipped shapes-clip"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", batch_size: int = 16, device=None,
                 dtype=None):
        super().__init__(model, processor, batch_size, device, dtype)

    def _score(self, images, prompts):
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return self.model.logit_scale.exp().float() * cos, {"pickscore_cos": cos}
