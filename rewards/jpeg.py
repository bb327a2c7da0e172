"""JPEG (in)compressibility, DDPO's simplest rewards (Black et al., 2023): the size in kB of the
image saved as JPEG at quality 95, negated for compressibility."""

from __future__ import annotations

import io

import torch

from rewards.base import Reward, RewardOutput, register, to_pil


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


@register("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Minus the image's JPEG size in kB at quality 95 (DDPO's compressibility)."""

    def __call__(self, images, prompts, metadata):
        kb = jpeg_kilobytes(images)
        return RewardOutput(-kb, {"jpeg_kb": kb})


@register("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """The image's JPEG size in kB at quality 95 (DDPO's incompressibility)."""

    def __call__(self, images, prompts, metadata):
        kb = jpeg_kilobytes(images)
        return RewardOutput(kb, {"jpeg_kb": kb})
