"""LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor", used to filter
LAION-5B, Schuhmann et al., 2022; DDPO's aesthetic reward, Black et al., 2023).

    score = MLP(e / ||e||),  e = CLIP ViT-L/14 image embedding (get_image_features)

The MLP is the published one: Linear 768->1024, Dropout 0.2, Linear 1024->128, Dropout 0.2,
Linear 128->64, Dropout 0.1, Linear 64->16, Linear 16->1. It has no activations (they are commented
out in the original), and the layer indices match its state dict (``layers.0``, ``layers.2``, ...), so
``sac+logos+ava1-l14-linearMSE.pth`` loads as it is. Scores are on the 1-10 rating scale.

``weights``: local ``.pth`` (read with ``torch.load(weights_only=True)``) or ``.safetensors`` file.
``clip`` / ``processor``: hub id or local folder of the CLIP model the head was trained on.
"""

from __future__ import annotations

from torch import nn

from rewards.base import register
from rewards.clip_common import CLIPReward, load_state_dict, local_file


class AestheticMLP(nn.Module):
    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds):
        return self.layers(embeds).squeeze(-1)


@register("aesthetic")
class Aesthetic(CLIPReward):
    """LAION aesthetic predictor v2 on CLIP ViT-L/14 image embeddings (1-10 scale; DDPO's aesthetic reward)."""

    needs = "weights: the MLP file (weights=) and openai/clip-vit-large-patch14"

    def __init__(self, weights: str | None = None, clip: str = "openai/clip-vit-large-patch14",
                 processor: str | None = None, batch_size: int = 16, device=None, dtype=None):
        super().__init__(clip, processor, batch_size, device, dtype)
        self.weights = local_file(weights, "aesthetic weights (sac+logos+ava1-l14-linearMSE.pth)")

    def _load(self):
        super()._load()
        self.mlp = AestheticMLP(self.model.config.projection_dim)
        self.mlp.load_state_dict(load_state_dict(self.weights))
        self.mlp.eval().requires_grad_(False).to(self.device, self.dtype)

    def _score(self, images, prompts):
        embeds = self.image_embeds(images)
        return self.mlp(embeds.to(self.dtype)).float(), {}
