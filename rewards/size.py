"""The shapes world's object-size classifier as a differentiable reward: log p(y | x0) (CTRL).

``y`` is the size class a sample was asked for (``metadata["condition"]``: small / medium / large, see
``eval.shapes.render.SIZE_CLASSES``), ``p`` a small CNN trained on renders of the train prompts
(``launch/train_size_classifier.py``, shipped as ``assets/size-classifier``), with its softmax
temperature fitted on held-out renders as CTRL's official code does. The score keeps its graph to
the images, so CTRL backpropagates through it into the sampler.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rewards.base import Reward, RewardOutput, register

SHIPPED = "size-classifier"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class SizeClassifier(nn.Module):
    """Images (B, 3, 64, 64) in [0, 1] -> logits over the size classes."""

    def __init__(self, classes: list[str], width: int = 16, temperature: float = 1.0):
        super().__init__()
        self.classes, self.width = list(classes), width
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(4 * w * 16, len(classes))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != 64:  # classified at the shapes world's canvas size
            images = nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
        return self.head(self.features(2 * images - 1).flatten(1)) / self.temperature

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps({"classes": self.classes, "width": self.width}, indent=1) + "\n")

    @classmethod
    def load(cls, source: str | Path) -> SizeClassifier:
        folder = Path(source)
        if str(source) == SHIPPED:
            from finetune.models.hub import ASSETS

            folder = ASSETS / SHIPPED
        if not (folder / CONFIG).is_file():
            raise FileNotFoundError(f"size classifier {source!r}: no {CONFIG} in {folder}; rebuild the shipped one "
                                    "with launch/train_size_classifier.py or pass its folder (reward.model)")
        config = json.loads((folder / CONFIG).read_text())
        model = cls(config["classes"], config["width"])
        model.load_state_dict(load_file(folder / WEIGHTS))
        return model.eval().requires_grad_(False)


@register("size_classifier")
class SizeReward(Reward):
    """log p(y | image) of the requested size class y (``metadata["condition"]``)."""

    differentiable = True

    def __init__(self, model: str = SHIPPED):
        self.classifier = SizeClassifier.load(model)
        self.classes = self.classifier.classes

    def __call__(self, images, prompts, metadata):
        missing = [i for i, m in enumerate(metadata) if m.get("condition") not in self.classes]
        if missing:
            raise ValueError(f"size_classifier scores a sample against the size class it was asked for "
                             f"(metadata 'condition' in {self.classes}); rows {missing[:5]} have none")
        classifier = self.classifier.to(images.device)
        y = torch.tensor([self.classes.index(m["condition"]) for m in metadata], device=images.device)
        log_p = torch.log_softmax(classifier(images.float()), dim=1)
        chosen = log_p.gather(1, y[:, None]).squeeze(1)
        return RewardOutput(chosen, {"accuracy": (log_p.argmax(1) == y).float().detach()})
