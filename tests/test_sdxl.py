"""SDXL (two text encoders, pooled and size conditioning) through the policy, the trainer and `diffrl sample`.

The oracle is StableDiffusionXLPipeline itself: the policy's deterministic samples must be the
pipeline's on the same initial latents, and a trained LoRA loaded into a fresh pipeline must
reproduce the policy's samples.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import load_config
from finetune.models import peek_family, wrap_pipeline
from finetune.models.hub import load_pipeline, merge_lora
from finetune.models.sdxl import SDXLPolicy
from finetune.rollout import sample
from finetune.trainer import Trainer
from tests.helpers import FAST, tiny_sdxl

PROMPTS = ["a photo of a red circle", "a photo of two stars"]
CONFIGS = {"ddpo": "configs/ddpo_shapes_sd.yaml", "nft": "configs/nft_shapes_flow.yaml",
           "awm": "configs/awm_shapes_flow.yaml"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "model"
    tiny_sdxl().save_pretrained(folder)
    return folder


def pipe_images(pipe, noise, guidance_scale, steps=3):
    return pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance_scale,
                output_type="pt").images


@pytest.mark.parametrize("zeros", [True, False], ids=["zero-negative", "empty-prompt-negative"])
def test_deterministic_sampling_equals_the_pipeline(zeros):
    pipe = tiny_sdxl()
    pipe.register_to_config(force_zeros_for_empty_prompt=zeros)
    policy = wrap_pipeline(pipe, guidance_scale=3.0, num_steps=3)
    assert isinstance(policy, SDXLPolicy) and policy.family == "sd"
    cond = policy.encode(PROMPTS)
    assert cond["embeds"].shape == cond["neg"].shape == (2, 16, 32)  # both encoders' hidden states (16 + 16)
    assert cond["pooled"].shape == cond["neg_pooled"].shape == (2, 16)
    assert cond["time_ids"].tolist() == cond["neg_time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    assert bool((cond["neg"] == 0).all()) == zeros and bool((cond["neg_pooled"] == 0).all()) == zeros
    noise = policy.initial_noise([5, 6])
    ours = sample(policy, PROMPTS, noise, stochastic=False).images
    torch.testing.assert_close(ours, pipe_images(pipe, noise, 3.0), rtol=0, atol=1e-4)


def test_pooled_embedding_and_time_ids_reach_the_unet():
    policy = wrap_pipeline(tiny_sdxl(), guidance_scale=1.0, num_steps=3)
    cond = policy.encode(PROMPTS[:1])
    assert set(cond) == {"embeds", "pooled", "time_ids"}  # no negatives without guidance
    x, t = policy.initial_noise([1]), policy.timesteps()[0]
    out = policy.predict(x, t, cond)
    for key in ("pooled", "time_ids"):
        assert (policy.predict(x, t, {**cond, key: 2 * cond[key] + 1}) - out).abs().max() > 1e-5, key


@pytest.mark.filterwarnings("ignore:`upcast_vae` is deprecated:FutureWarning")  # the pipeline's own call
def test_fp16_vae_and_latent_statistics_decode_as_the_pipeline_does():
    pipe = tiny_sdxl()
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0])  # optional
    policy = wrap_pipeline(pipe, guidance_scale=3.0, num_steps=3)
    noise = policy.initial_noise([7, 8])
    ro = sample(policy, PROMPTS, noise, stochastic=False)
    assert pipe.vae.dtype == torch.float16  # cast back after decoding
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not undo the upcast
        assert torch.equal(policy.latents_to_images(ro.final), ro.images)
    torch.testing.assert_close(ro.images, pipe_images(pipe, noise, 3.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("objective", ["ddpo", "nft", "awm"])
def test_one_epoch_trains_a_lora_that_reloads_into_a_fresh_pipeline(model_dir, tmp_path, objective):
    assert peek_family(str(model_dir)) == "sd"
    cfg = load_config(CONFIGS[objective], FAST + [f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}",
                                                  "train.epochs=1", "train.lr=1e-2"])
    trainer = Trainer(cfg)
    policy = trainer.policy
    assert isinstance(policy, SDXLPolicy)
    before = {name: p.detach().clone() for name, p in trainer.trainable_state().items()}
    history = trainer.train()
    assert np.isfinite(history[-1]["reward_mean"])
    assert any(not torch.equal(before[name], p) for name, p in trainer.trainable_state().items())

    noise = policy.initial_noise([11, 12])
    with trainer.ema_weights():  # NFT and AWM export their EMA weights
        ours = sample(policy, PROMPTS, noise, stochastic=False).images
    pipe = load_pipeline(str(model_dir))
    base = pipe_images(pipe, noise, policy.guidance_scale)
    pipe.load_lora_weights(tmp_path / "run" / "lora")
    loaded = pipe_images(pipe, noise, policy.guidance_scale)
    torch.testing.assert_close(ours, loaded, rtol=0, atol=1e-4)
    assert (base - loaded).abs().max() > 1e-4  # the LoRA changes the samples
    if objective == "ddpo":
        merge_lora(str(model_dir), tmp_path / "run" / "lora", tmp_path / "merged")
        fused = pipe_images(load_pipeline(str(tmp_path / "merged")), noise, policy.guidance_scale)
        torch.testing.assert_close(fused, loaded, rtol=0, atol=1e-3)


def test_diffrl_sample_starts_from_the_policys_noise(model_dir, tmp_path):
    from eval.generate import image_seed
    from eval.shapes.grammar import write_jsonl
    from finetune.cli import main

    records = [{"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"}],
                "prompt": PROMPTS[0]},
               {"tag": "counting", "include": [{"class": "star", "count": 2}], "prompt": PROMPTS[1]}]
    write_jsonl(records, tmp_path / "prompts.jsonl")
    assert main(["sample", "--model", str(model_dir), "--metadata", str(tmp_path / "prompts.jsonl"),
                 "--out", str(tmp_path / "out"), "--images-per-prompt", "2", "--steps", "3", "--batch-size", "3"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "00001" / "samples" / "0001.png")).astype(int)
    assert written.shape == (16, 16, 3)
    policy = wrap_pipeline(load_pipeline(str(model_dir)), guidance_scale=4.0, num_steps=3)  # `sample`'s defaults
    image = sample(policy, PROMPTS[1:], policy.initial_noise([image_seed(0, 1, 1)]), stochastic=False).images[0]
    expected = (image.permute(1, 2, 0) * 255).round().numpy()
    assert np.abs(written - expected).max() <= 1
