"""ImageReward (Xu et al., 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"): a BLIP image-text encoder with an MLP head, through the ``image-reward``
package (``pip install image-reward``, imported on first use only).

    score = (raw - 0.16717362830052426) / 1.0333394966054072

``raw`` is the MLP head on the [CLS] feature of BLIP's text encoder cross-attending to the image
(prompt padded to 35 tokens, image resized to 224 with CLIP's normalisation, as in the package);
mean and std are the published standardisation constants, so this equals the package's ``score``,
batched. ``checkpoint`` is "ImageReward-v1.0" (downloaded by the package, online only) or a local
``ImageReward.pt``; offline also pass ``med_config`` (local ``med_config.json``) and keep
``bert-base-uncased`` in the Hugging Face cache, which BLIP's tokenizer loads.
The formula is tested with a fake model (the package and its weights cannot be installed offline).
"""

from __future__ import annotations

import torch

from rewards.base import register, to_pil
from rewards.clip_common import ModelReward, check_source

MEAN = 0.16717362830052426
STD = 1.0333394966054072


def load_imagereward(checkpoint: str, med_config: str | None, device: torch.device):
    try:
        import ImageReward
    except ImportError as error:
        raise ImportError("the imagereward reward needs the image-reward package: pip install image-reward") from error
    try:
        return ImageReward.load(checkpoint, device=str(device), med_config=med_config)
    except (OSError, RuntimeError, ValueError) as error:
        raise OSError(f"imagereward: could not load {checkpoint!r} (offline, or not a file); pass a local path: "
                      "checkpoint=/path/to/ImageReward.pt med_config=/path/to/med_config.json") from error


@register("imagereward")
class ImageRewardScore(ModelReward):
    """ImageReward human-preference score (Xu et al. 2023)."""

    needs = "the image-reward package and ImageReward-v1.0 weights"

    def __init__(self, checkpoint: str = "ImageReward-v1.0", med_config: str | None = None,
                 batch_size: int = 16, device=None, dtype=None):
        super().__init__(batch_size, device, dtype)
        check_source(checkpoint, "imagereward checkpoint")
        if med_config is not None:
            check_source(med_config, "imagereward med_config")
        self.checkpoint, self.med_config = checkpoint, med_config

    def _load(self):
        model = load_imagereward(self.checkpoint, self.med_config, self.device)
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)

    def _score(self, images, prompts):
        blip = self.model.blip
        tokens = blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pixels = torch.stack([self.model.preprocess(image) for image in to_pil(images)]).to(self.device, self.dtype)
        image_embeds = blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = blip.text_encoder(tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device),
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True)
        raw = self.model.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1).float()
        return (raw - MEAN) / STD, {"imagereward_raw": raw}
