"""FLUX (FluxPipeline) adapter: packed latents, FLUX's schedule and embedded guidance, training, export."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from finetune.models import peek_family, wrap_pipeline
from finetune.models.flux import FluxPolicy
from finetune.models.hub import call_kwargs, load_pipeline, merge_lora, save_pipeline
from finetune.rollout import sample
from tests.helpers import FAST, tiny_flux

PROMPTS = ["a photo of a red circle", "a photo of two stars"]
# The flow recipes, and DDPO's (an SD recipe) with the flow SDE's noise level instead of DDIM's eta.
RECIPES = {"flow_grpo": ("configs/flow_grpo_shapes_flow.yaml", []), "nft": ("configs/nft_shapes_flow.yaml", []),
           "awm": ("configs/awm_shapes_flow.yaml", []), "ddpo": ("configs/ddpo_shapes_sd.yaml", ["model.noise=0.7"])}


def pack(x):
    return FluxPipeline._pack_latents(x, *x.shape)


@pytest.fixture(scope="module", autouse=True)
def keep_global_rng():
    """Leave torch's global generator as found (the trainer seeds it), so later test modules that draw
    from it unseeded see the same numbers with or without this one."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny guidance-distilled FLUX saved as a folder, with its declared image size and T5 length."""
    folder = tmp_path_factory.mktemp("flux") / "model"
    save_pipeline(tiny_flux(), folder)
    return folder


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_step_and_log_prob_on_packed_latents_equal_the_unpacked_computation(sde_type):
    policy = wrap_pipeline(tiny_flux(), guidance_scale=3.5, num_steps=4)
    policy.sde_type = sde_type
    timesteps = policy.timesteps()
    gen = torch.Generator().manual_seed(0)
    x, v, prev = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    t = timesteps[[0, 2]]  # one timestep per sample, as training batches mix steps
    flat = policy.step(pack(v), t, pack(x), prev_sample=pack(prev))
    grid = policy.step(v, t, x, prev_sample=prev)  # the same maths on (B, C, H, W)
    torch.testing.assert_close(flat.log_prob, grid.log_prob, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat.prev_sample_mean, pack(grid.prev_sample_mean))
    assert (flat.log_prob != 0).all()
    # A sampled step on packed latents unpacks to a sample of the unpacked step's Gaussian.
    drawn = policy.step(pack(v), t, pack(x), generator=torch.Generator().manual_seed(1))
    unpacked = FluxPipeline._unpack_latents(drawn.prev_sample, 16, 16, policy.pipe.vae_scale_factor)
    again = policy.step(v, t, x, prev_sample=unpacked)
    torch.testing.assert_close(again.log_prob, drawn.log_prob, rtol=1e-5, atol=1e-6)


def test_recorded_log_probs_recompute_with_mixed_steps_per_batch():
    """As the trainer's batches do: each sample its own recorded step, time and packed latents."""
    policy = wrap_pipeline(tiny_flux(), guidance_scale=3.5, num_steps=3)
    ro = sample(policy, PROMPTS, policy.initial_noise([1, 2]), trajectory=True,
                generator=torch.Generator().manual_seed(0))
    assert ro.latents.shape == (2, 4, 16, 16) and ro.log_probs.shape == (2, 3)
    idx, k = torch.arange(2), torch.tensor([0, 2])
    x, t = ro.latents[idx, k], ro.timesteps[k]
    step = policy.step(policy.predict(x, t, ro.cond), t, x, prev_sample=ro.latents[idx, k + 1])
    torch.testing.assert_close(step.log_prob, ro.log_probs[idx, k], rtol=0, atol=1e-5)


def test_timesteps_are_the_pipelines_resolution_dependent_schedule():
    grids = []
    for height in (16, 32):
        pipe = tiny_flux()
        pipe.call_kwargs = {**pipe.call_kwargs, "height": height, "width": height}
        policy = wrap_pipeline(pipe, guidance_scale=3.5, num_steps=4)
        ours, grid = policy.timesteps().clone(), policy.time_grid()
        pipe(prompt=PROMPTS[:1], num_inference_steps=4, output_type="latent", **call_kwargs(pipe))
        assert torch.equal(ours, pipe.scheduler.timesteps)
        torch.testing.assert_close(grid, pipe.scheduler.sigmas[:-1].float())
        grids.append(grid)
    # FLUX's shift mu grows with the number of latent patches: above the plain linspace, more at 32 px.
    linear = torch.linspace(1.0, 0.25, 4)
    assert (grids[0][1:] > linear[1:]).all() and (grids[1][1:] > grids[0][1:]).all()


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_deterministic_sampling_equals_the_diffusers_pipeline(guidance_embeds):
    pipe = tiny_flux(guidance_embeds=guidance_embeds)
    policy = wrap_pipeline(pipe, guidance_scale=3.5, num_steps=3)
    assert isinstance(policy, FluxPolicy) and not policy.use_guidance  # no CFG pass, whatever the scale
    assert set(policy.encode(PROMPTS)) == {"embeds", "pooled"}
    seeds = [5, 6]
    noise = policy.initial_noise(seeds)
    assert noise.shape == (2, *policy.latent_shape()) == (2, 16, 16)  # 4x4 patches of 4 channels x 2x2
    ours = sample(policy, PROMPTS, noise, stochastic=False).images
    kwargs = dict(num_inference_steps=3, guidance_scale=3.5, output_type="pt", **call_kwargs(pipe))
    theirs = pipe(prompt=PROMPTS, latents=noise.clone(), **kwargs).images
    assert ours.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # The pipeline's own noise for the same seeds is ours: FluxPipeline.prepare_latents' draw, packed.
    seeded = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs).images
    torch.testing.assert_close(seeded, theirs, rtol=0, atol=1e-6)
    # FLUX.1-dev's embedded guidance changes the samples; FLUX.1-schnell has none to change.
    policy.guidance_scale = 1.0
    other = sample(policy, PROMPTS, noise, stochastic=False).images
    assert (ours - other).abs().max() > 1e-4 if guidance_embeds else torch.equal(ours, other)


@pytest.mark.parametrize("objective", list(RECIPES))
def test_one_epoch_trains_and_the_saved_lora_reproduces_the_policy(model_dir, tmp_path, objective):
    from finetune.config import load_config
    from finetune.trainer import Trainer

    assert peek_family(str(model_dir)) == "flow"
    recipe, extra = RECIPES[objective]
    cfg = load_config(recipe, FAST + [f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}", "train.epochs=1",
                                      "train.lr=1e-2", "train.ema_decay=0", "model.guidance_scale=3.5", *extra])
    trainer = Trainer(cfg)
    history = trainer.train()
    assert len(history) == 1 and np.isfinite(history[0]["reward_mean"])
    policy = trainer.policy
    assert isinstance(policy, FluxPolicy) and trainer.global_step >= 1
    noise = policy.initial_noise([11, 12])
    ours = sample(policy, PROMPTS, noise, stochastic=False).images
    pipe = load_pipeline(str(model_dir))
    kwargs = dict(num_inference_steps=3, guidance_scale=3.5, output_type="pt", **call_kwargs(pipe))
    base = pipe(prompt=PROMPTS, latents=noise.clone(), **kwargs).images
    pipe.load_lora_weights(tmp_path / "run" / "lora")
    trained = {name for name, _ in pipe.transformer.named_parameters() if "lora_A" in name}
    assert any(name.startswith("single_transformer_blocks.") for name in trained)
    loaded = pipe(prompt=PROMPTS, latents=noise.clone(), **kwargs).images
    torch.testing.assert_close(ours, loaded, rtol=0, atol=1e-4)
    assert (base - loaded).abs().max() > 1e-4  # the LoRA changes the samples
    if objective == "flow_grpo":
        merged = merge_lora(str(model_dir), tmp_path / "run" / "lora", tmp_path / "merged")
        fused = load_pipeline(str(tmp_path / "merged"))(prompt=PROMPTS, latents=noise.clone(), **kwargs).images
        assert call_kwargs(merged) == call_kwargs(pipe)
        torch.testing.assert_close(fused, loaded, rtol=0, atol=1e-3)


def test_diffrl_sample_starts_from_the_policys_noise(model_dir, tmp_path):
    from eval.generate import image_seed
    from eval.shapes import grammar
    from finetune.cli import main

    records = grammar.split("eval")[:2]
    grammar.write_jsonl(records, tmp_path / "prompts.jsonl")
    assert main(["sample", "--model", str(model_dir), "--metadata", str(tmp_path / "prompts.jsonl"),
                 "--out", str(tmp_path / "out"), "--images-per-prompt", "2", "--steps", "3", "--batch-size", "3"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "00001" / "samples" / "0001.png")).astype(int)
    assert written.shape == (16, 16, 3)  # the folder's declared size, not FluxPipeline's 1024 default
    policy = wrap_pipeline(load_pipeline(str(model_dir)), guidance_scale=4.0, num_steps=3)  # `sample`'s defaults
    noise = policy.initial_noise([image_seed(0, 1, 1)])  # image 1 of prompt 1, seed 0
    image = sample(policy, [records[1]["prompt"]], noise, stochastic=False).images[0]
    expected = (image.permute(1, 2, 0) * 255).round().numpy()
    assert np.abs(written - expected).max() <= 1


def test_sd3_lora_targets_the_joint_attention_only():
    """Flow-GRPO's SD3 targets are ``attn.*``: SD3.5's image-only second attention (attn2) stays frozen."""
    from diffusers import SD3Transformer2DModel

    from finetune.models.flow import FlowPolicy

    policy = FlowPolicy.__new__(FlowPolicy)
    policy.pipe = type("Pipe", (), {})()
    policy.pipe.transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8, dual_attention_layers=(0,))
    policy.add_lora(rank=2, alpha=2)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in policy.denoiser.named_parameters() if ".lora_A" in name}
    assert "transformer_blocks.0.attn.to_q" in adapted and "transformer_blocks.0.attn.add_k_proj" in adapted
    assert not any(".attn2." in name for name in adapted)
