"""OCR reward for text rendering, after Flow-GRPO's (Liu et al., 2025) ``flow_grpo/ocr.py``.

The prompt asks for a text in double quotes (``A sign that says "Open Late"``); the reward is how
close the text read back from the image is to it. With both texts lower-cased and their spaces
removed, ``r`` the recognised text and ``t`` the target:

    d = 0 if t is a substring of r else levenshtein(r, t)
    score = 1 - min(d, len(t)) / len(t)

so a clean rendering scores 1, unrelated text or no text at all scores 0 (the clamp keeps a long
wrong reading from going below 0), and extra text around the target costs nothing. ``info`` holds
``ocr_distance = min(d, len(t)) / len(t)`` per image.

The target is ``metadata["text"]`` when present, else the part of the prompt between the first pair
of double quotes (Flow-GRPO's ``prompt.split('"')[1]``). A prompt with neither, or an empty target,
raises an error naming the prompt (Flow-GRPO would take the rest of the prompt after a lone quote,
or divide by zero).

Departures from Flow-GRPO, both about the engine:

* The recogniser is a transformers ``VisionEncoderDecoderModel`` (TrOCR, default
  ``microsoft/trocr-base-printed``) with its processor, decoded greedily, instead of PaddleOCR:
  PaddleOCR needs the PaddlePaddle framework beside torch, while a transformers model loads like
  the other model rewards here (hub id or local folder, lazily, on ``device``/``dtype``, batched).
  TrOCR reads one text line from the whole image, without PaddleOCR's text detector (Flow-GRPO
  joins the lines PaddleOCR finds), so it is most reliable when the text fills much of the image.
* An error in recognition is raised, not scored as the maximum penalty, so that a broken model
  cannot train silently towards zero reward.
"""

from __future__ import annotations

import torch

from rewards.base import register, to_pil
from rewards.clip_common import ModelReward, check_source, from_pretrained


def normalise(text: str) -> str:
    """Flow-GRPO's normalisation: spaces removed, lower case."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1), row by row."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_distance(recognised: str, target: str) -> float:
    """``min(d, len(t)) / len(t)`` on normalised texts (0 when the target appears in the reading)."""
    r, t = normalise(recognised), normalise(target)
    if not t:
        raise ValueError(f"ocr: empty target text {target!r}")
    d = 0 if t in r else levenshtein(r, t)
    return min(d, len(t)) / len(t)


def target_text(prompt: str, metadata: dict | None = None) -> str:
    """``metadata["text"]`` if present, else the first double-quoted part of the prompt."""
    if metadata and metadata.get("text") is not None:
        text = str(metadata["text"])
    else:
        parts = prompt.split('"')
        if len(parts) < 3:
            raise ValueError(f'ocr reward: no target text in prompt {prompt!r}; put the text to render in double '
                             'quotes ("...") or give it as metadata["text"]')
        text = parts[1]
    if not normalise(text):
        raise ValueError(f"ocr reward: empty target text {text!r} for prompt {prompt!r}")
    return text


@register("ocr")
class OCRReward(ModelReward):
    """1 - clamped edit distance between the quoted text and what TrOCR reads (Flow-GRPO's OCR reward)."""

    needs = "weights: microsoft/trocr-base-printed (model=)"

    def __init__(self, model: str = "microsoft/trocr-base-printed", processor: str | None = None,
                 max_new_tokens: int = 64, batch_size: int = 16, device=None, dtype=None):
        super().__init__(batch_size, device, dtype)
        self.model_source, self.processor_source = model, processor or model
        self.max_new_tokens = max_new_tokens
        check_source(self.model_source, "ocr model")
        check_source(self.processor_source, "ocr processor")

    def _load(self) -> None:
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        self.processor = from_pretrained(AutoProcessor.from_pretrained, self.processor_source, "ocr processor")
        model = from_pretrained(VisionEncoderDecoderModel.from_pretrained, self.model_source, "ocr model")
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)

    def recognise(self, images: torch.Tensor) -> list[str]:
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        ids = self.model.generate(pixels.to(self.device, self.dtype), max_new_tokens=self.max_new_tokens,
                                  do_sample=False, num_beams=1)
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def _score(self, images, targets):
        distance = torch.tensor([ocr_distance(r, t) for r, t in zip(self.recognise(images), targets)])
        return 1 - distance, {"ocr_distance": distance}

    def __call__(self, images, prompts, metadata):
        # Targets first, so that a prompt without one fails before the model loads; the batching of
        # ModelReward then hands each chunk its targets in place of the prompts.
        metadata = metadata if metadata else [{}] * len(prompts)
        if len(metadata) != len(prompts):
            raise ValueError(f"ocr: {len(prompts)} prompts but {len(metadata)} metadata entries")
        targets = [target_text(p, m) for p, m in zip(prompts, metadata)]
        return super().__call__(images, targets, metadata)
