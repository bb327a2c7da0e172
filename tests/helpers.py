"""Tiny random pipelines shared by tests (built from configs; nothing downloaded)."""

import functools
from pathlib import Path

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


def tiny_flux(seed=0, guidance_embeds=True):
    """FLUX.1-dev layout (guidance-distilled) by default; ``guidance_embeds=False`` is FLUX.1-schnell's."""
    torch.manual_seed(seed)
    return tiny.flux_pipeline(layers=1, single_layers=1, head_dim=16, heads=2, text_hidden=32, text_layers=1,
                              tokenizer_dir=tokenizer_dir(), guidance_embeds=guidance_embeds, **TEST_SIZES)


def tiny_sdxl(seed=0, text_hidden=16):
    torch.manual_seed(seed)
    return tiny.sdxl_pipeline(unet_channels=(16, 32), text_hidden=text_hidden, text_layers=1,
                              tokenizer_dir=tokenizer_dir(), **TEST_SIZES)


def tiny_sd_v(seed=0, **scheduler):
    """The tiny SD pipeline as a v-prediction model (SD 2.x-768 style); ``scheduler`` overrides its config."""
    from diffusers import DDIMScheduler

    pipe = tiny_sd(seed)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                               **{"prediction_type": "v_prediction", **scheduler})
    return pipe


# Overrides that make a recipe a seconds-long run on the tiny pipelines below.
FAST = ["model.num_steps=3", "sample.groups_per_epoch=2", "sample.group_size=4", "sample.batch_size=8",
        "train.batch_size=4", "train.gradient_accumulation_steps=1", "eval.every=0", "log.tensorboard=false", "cpu=true",
        "reward=brightness"]


def save_tiny_models(root: Path) -> Path:
    """A tiny SD pipeline in root/sd and a tiny SD3 pipeline in root/flow."""
    tiny_sd().save_pretrained(root / "sd")
    tiny_sd3().save_pretrained(root / "flow")
    return root


RESPONSIVE_VAE = Path(__file__).resolve().parent / "assets" / "responsive_vae"


def with_responsive_vae(pipe):
    """Swap in a trained shapes VAE whose decoded brightness follows the latents, so that a pixel-level
    reward gives a tiny random denoiser a learnable signal. A random VAE decodes everything to flat
    grey, and the shipped VAE, trained twice as long, decodes off-distribution latents to background.
    This one is the shapes VAE of a shorter pretraining: `launch/pretrain_shapes.py --stage vae
    --vae-steps 1200 --threads 2` (latents 4x16x16)."""
    from diffusers import AutoencoderKL

    pipe.vae = AutoencoderKL.from_pretrained(RESPONSIVE_VAE)
    return pipe


def tiny_on_responsive_vae(family, seed=0):
    torch.manual_seed(seed)
    sizes = dict(tokenizer_dir=tokenizer_dir(), latent_size=16)
    if family == "sd":
        pipe = tiny.sd_pipeline(unet_channels=(16, 32), text_hidden=32, text_layers=1, **sizes)
    else:
        pipe = tiny.sd3_pipeline(layers=1, head_dim=16, heads=2, text_hidden=32, text_layers=1, **sizes)
    return with_responsive_vae(pipe)


def load_launch_script(filename: str):
    """Import a script from launch/ (not a package) as a module."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "launch" / filename
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
