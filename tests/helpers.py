"""Tiny random pipelines shared by tests (built from configs; nothing downloaded)."""

import functools

import torch

from finetune.models import tiny

TEST_SIZES = dict(vae_channels=(8, 16), latent_size=8)


@functools.lru_cache(maxsize=None)
def tokenizer_dir(tmp_root="/tmp/diffrl-test-tokenizer"):
    tiny.write_tokenizer(tmp_root)
    return tmp_root


def tiny_sd(seed=0):
    torch.manual_seed(seed)
    return tiny.sd_pipeline(unet_channels=(16, 32), text_hidden=32, text_layers=1,
                            tokenizer_dir=tokenizer_dir(), **TEST_SIZES)


def tiny_sd3(seed=0):
    torch.manual_seed(seed)
    return tiny.sd3_pipeline(layers=1, head_dim=16, heads=2, text_hidden=32, text_layers=1,
                             tokenizer_dir=tokenizer_dir(), **TEST_SIZES)


def with_shipped_vae(pipe):
    """Swap in the shipped shapes VAE: decoded images then really depend on the latents, so a
    pixel-level reward gives a learnable signal (a random VAE decodes everything to flat grey)."""
    from diffusers import AutoencoderKL

    from finetune.models.hub import ASSETS

    pipe.vae = AutoencoderKL.from_pretrained(ASSETS / "shapes-flow" / "vae")
    return pipe


def tiny_on_shipped_vae(family, seed=0):
    torch.manual_seed(seed)
    sizes = dict(tokenizer_dir=tokenizer_dir(), latent_size=16)
    if family == "sd":
        pipe = tiny.sd_pipeline(unet_channels=(16, 32), text_hidden=32, text_layers=1, **sizes)
    else:
        pipe = tiny.sd3_pipeline(layers=1, head_dim=16, heads=2, text_hidden=32, text_layers=1, **sizes)
    return with_shipped_vae(pipe)
