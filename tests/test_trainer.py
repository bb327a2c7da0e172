"""The trainer end to end on tiny random models: learning, resume, LoRA export, bad input."""

import numpy as np
import pytest
import torch
from scipy.stats import linregress

from finetune.config import load_config
from finetune.models.hub import load_pipeline, merge_lora
from finetune.trainer import Trainer
from tests.helpers import FAST, save_tiny_models, tiny_on_responsive_vae

CONFIGS = {"sd": "configs/ddpo_shapes_sd.yaml", "flow": "configs/flow_grpo_shapes_flow.yaml",
           "nft": "configs/nft_shapes_flow.yaml", "awm": "configs/awm_shapes_flow.yaml",
           "loop": "configs/loop_shapes_sd.yaml", "g2rpo": "configs/g2rpo_shapes_flow.yaml"}
FAMILY = {"sd": "sd", "flow": "flow", "nft": "flow", "awm": "flow", "loop": "sd", "g2rpo": "flow"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def run(models, family, out, *overrides):
    cfg = load_config(CONFIGS[family], FAST + [f"model.path={models / FAMILY[family]}", f"output_dir={out}", *overrides])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


@pytest.mark.parametrize("family, extra", [("sd", []), ("flow", ["train.ema_decay=0.9"]),
                                           ("nft", ["train.gradient_accumulation_steps=1"])])
def test_resume_ends_with_the_same_parameters(models, tmp_path, family, extra):
    full = run(models, family, tmp_path / "full", "train.epochs=3", *extra)
    run(models, family, tmp_path / "cut", "train.epochs=2", *extra)  # stops after epoch 2's checkpoint
    resumed = run(models, family, tmp_path / "cut", "train.epochs=3", *extra)
    assert resumed.start_epoch == 2
    a, b = full.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [h["reward_mean"] for h in resumed.history] == [h["reward_mean"] for h in full.history]
    if full.ema is not None:
        assert all(torch.equal(x, y) for x, y in zip(full.ema.shadow_params, resumed.ema.shadow_params))
    for name, value in full.objective.state_dict().items():  # e.g. NFT's old policy
        assert torch.equal(value, resumed.objective.state_dict()[name]), name
    # The parameters moved at all (otherwise equality would prove nothing).
    fresh = run(models, family, tmp_path / "zero", "train.epochs=0", *extra)
    assert any(not torch.equal(a[n], fresh.trainable_state()[n]) for n in a)


@pytest.mark.parametrize("family", ["sd", "flow"])
def test_saved_lora_loads_into_a_fresh_pipeline(models, tmp_path, family):
    # No EMA: the Flow-GRPO recipe's (every 8 steps) would export the untrained LoRA after one step.
    # alpha != rank: the saved folder must carry the adapter's scale (diffusers assumes alpha = rank).
    trainer = run(models, family, tmp_path / "run", "train.epochs=1", "train.lr=1e-2", "train.ema_decay=0",
                  "lora.rank=4", "lora.alpha=8")
    policy = trainer.policy
    noise = policy.initial_noise([11, 12])
    prompts = ["a photo of a red circle", "a photo of two stars"]
    from finetune.rollout import sample

    ours = sample(policy, prompts, noise, stochastic=False).images
    pipe = load_pipeline(str(models / family))
    base = pipe(prompt=prompts, latents=noise.clone(), num_inference_steps=3, guidance_scale=4.0, output_type="pt").images
    pipe.load_lora_weights(tmp_path / "run" / "lora")
    loaded = pipe(prompt=prompts, latents=noise.clone(), num_inference_steps=3, guidance_scale=4.0, output_type="pt").images
    assert torch.allclose(ours, loaded, atol=1e-4)
    assert not torch.allclose(base, loaded, atol=1e-4)  # the LoRA changes the samples
    merged = merge_lora(str(models / family), tmp_path / "run" / "lora", tmp_path / "merged")
    fused = load_pipeline(str(tmp_path / "merged"))(prompt=prompts, latents=noise.clone(), num_inference_steps=3,
                                                     guidance_scale=4.0, output_type="pt").images
    assert merged is not None and torch.allclose(fused, loaded, atol=1e-3)


def test_a_non_finite_reward_stops_the_run_by_name(models, tmp_path):
    """(Configuration errors are refused before the model loads: tests/test_preflight.py.)"""
    from rewards.base import REGISTRY, Reward, RewardOutput, register

    @register("test_nan")
    class NaNReward(Reward):
        def __call__(self, images, prompts, metadata):
            return RewardOutput(torch.full((len(images),), float("nan")))

    try:
        trainer = Trainer(load_config(CONFIGS["sd"], FAST + [f"model.path={models / 'sd'}", f"output_dir={tmp_path}",
                                                             "reward=test_nan", "train.epochs=1"]))
        with pytest.raises(FloatingPointError, match="reward 'test_nan' returned 8 non-finite"):
            trainer.train()
    finally:
        REGISTRY.pop("test_nan")


@pytest.mark.parametrize("family, extra", [
    ("sd", ["lora.enabled=false", "train.lr=3e-3", "model.noise=0.5", "objective.clip_range=0.2", "train.epochs=24"]),
    ("flow", ["objective.kl_beta=0.0", "objective.clip_range=0.2", "lora.enabled=false", "train.lr=3e-3", "train.epochs=24"]),
    ("nft", ["train.gradient_accumulation_steps=1", "lora.enabled=false", "train.lr=3e-3", "train.epochs=24"]),
    ("awm", ["train.gradient_accumulation_steps=2", "lora.enabled=false", "train.lr=3e-3", "train.epochs=24"]),
    ("loop", ["lora.enabled=false", "train.lr=1e-3", "objective.clip_range=0.2", "train.epochs=24"]),
    ("g2rpo", ["objective.clip_range=0.2", "lora.enabled=false", "train.lr=3e-3", "train.epochs=32"]),
])
def test_brightness_reward_rises(tmp_path, family, extra):
    """A short real run on a tiny random denoiser (on a trained VAE): the pixel reward must go up."""
    tiny_on_responsive_vae(FAMILY[family]).save_pretrained(tmp_path / "model")
    cfg = load_config(CONFIGS[family], [
        f"model.path={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}", "cpu=true", "reward=brightness",
        "model.num_steps=4", "sample.groups_per_epoch=2", "sample.group_size=8", "sample.batch_size=16",
        "train.batch_size=8", "train.epochs=16", "train.lr=1e-2",
        "lora.rank=16", "lora.alpha=16", "eval.every=0", "log.tensorboard=false", *extra])
    trainer = Trainer(cfg)
    history = trainer.train()
    rewards = [h["reward_mean"] for h in history]
    # The per-epoch mean is noisy (16 fresh samples), so test the trend: a least-squares slope over the
    # epochs that is positive and significant (p < 0.01), and a last quarter above the first.
    fit = linregress(np.arange(len(rewards)), rewards)
    assert fit.slope > 0 and fit.pvalue < 0.01, (fit, rewards)
    q = len(rewards) // 4
    assert np.mean(rewards[-q:]) > np.mean(rewards[:q]), rewards
    # Full fine-tuning exports the trained pipeline as a folder that from_pretrained loads.
    def denoiser_weights(folder):
        pipe = load_pipeline(str(folder))
        return (pipe.unet if FAMILY[family] == "sd" else pipe.transformer).state_dict()

    exported, base = denoiser_weights(tmp_path / "run" / "model"), denoiser_weights(tmp_path / "model")
    with trainer.ema_weights():  # NFT and AWM export their EMA weights
        trained = {name: p.detach().clone() for name, p in trainer.trainable_state().items()}
    assert trained and all(torch.equal(exported[name], p) for name, p in trained.items())
    assert any(not torch.equal(exported[name], base[name]) for name in trained)


def test_prompt_sampling_balances_tags(models, tmp_path):
    import random
    from collections import Counter

    cfg = load_config(CONFIGS["sd"], FAST + [f"model.path={models / 'sd'}", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    rng = random.Random(0)
    by_tag = Counter(trainer.pick_prompt(rng)["tag"] for _ in range(1200))
    assert len(by_tag) == 6 and all(150 <= n <= 250 for n in by_tag.values()), by_tag  # ~200 each
    trainer.cfg.prompts.balance = "prompt"
    uniform = Counter(trainer.pick_prompt(rng)["tag"] for _ in range(1200))
    assert uniform["color_attr"] > 1000  # 93 % of the train split


@pytest.mark.parametrize("family", ["sd", "flow"])
def test_sde_window_samples_and_trains_only_its_steps(models, tmp_path, family):
    """Flow-GRPO-Fast: steps outside the window are the deterministic step, carry no log-prob, and
    are never trained on; a window that does not fit the steps is refused by name."""
    cfg = load_config(CONFIGS[family], FAST + [f"model.path={models / FAMILY[family]}", f"output_dir={tmp_path}",
                                               "model.num_steps=6", "sample.sde_window_size=2",
                                               "sample.sde_window_range=[1,4]", "train.timestep_fraction=1.0"])
    trainer = Trainer(cfg)
    rollout, advantages, _ = trainer.collect(0)
    windows = rollout.stochastic_steps
    assert windows.sum(1).eq(2).all()
    starts = windows.float().argmax(1)
    assert starts.ge(1).all() and starts.le(2).all()  # the window [start, start+2) lies in [1, 4)
    assert (rollout.log_probs[~windows] == 0).all() and (rollout.log_probs[windows] != 0).all()
    policy, cond = trainer.policy, rollout.cond
    for k in range(6):
        if windows[0, k]:
            continue
        deterministic = policy.step(policy.predict(rollout.latents[:1, k], rollout.timesteps[k],
                                                   {n: v[:1] for n, v in cond.items()}),
                                    rollout.timesteps[k], rollout.latents[:1, k], noise=0.0).prev_sample
        torch.testing.assert_close(deterministic, rollout.latents[:1, k + 1], rtol=1e-4, atol=1e-5)
    window_times = {float(t) for t in rollout.timesteps[windows.any(0)]}
    trained = [batch for batch in trainer.objective.batches(trainer.context(0), rollout, advantages)]
    assert len(trained) == 2 * (len(rollout) // cfg.train.batch_size)  # both window steps of every sample
    for batch in trained:
        assert {float(t) for t in batch["t"].reshape(-1)} <= window_times
        assert (batch["old_log_prob"] != 0).all()  # only recorded stochastic steps

    trainer.cfg.sample.sde_window_range = [4, 7]
    with pytest.raises(ValueError, match="sample.sde_window_range"):
        trainer.collect(1)


@pytest.mark.parametrize("family", ["sd", "flow"])
def test_timestep_range_trains_only_its_steps_and_keeps_sampling_stochastic(models, tmp_path, family):
    cfg = load_config(CONFIGS[family], FAST + [f"model.path={models / FAMILY[family]}", f"output_dir={tmp_path}",
                                               "model.num_steps=6", "train.timestep_range=[1,4]",
                                               "train.timestep_fraction=1.0"])
    trainer = Trainer(cfg)
    rollout, advantages, _ = trainer.collect(0)
    assert rollout.stochastic_steps.all()  # every step still explores
    allowed = {float(t) for t in rollout.timesteps[1:4]}
    trained = list(trainer.objective.batches(trainer.context(0), rollout, advantages))
    assert len(trained) == 3 * (len(rollout) // cfg.train.batch_size)  # the three steps of every sample
    seen = {float(t) for batch in trained for t in batch["t"].reshape(-1)}
    assert seen == allowed
    trainer.cfg.train.timestep_range = [4, 7]
    with pytest.raises(ValueError, match="train.timestep_range"):
        list(trainer.objective.batches(trainer.context(0), rollout, advantages))


def test_shared_noise_gives_each_group_one_initial_noise(models, tmp_path):
    cfg = load_config(CONFIGS["flow"], FAST + [f"model.path={models / 'flow'}", f"output_dir={tmp_path}",
                                               "sample.shared_noise=true", "sample.batch_size=3"])
    rollout, _, _ = Trainer(cfg).collect(0)
    g = cfg.sample.group_size
    groups = rollout.noise.reshape(-1, g, *rollout.noise.shape[1:])
    assert (groups == groups[:, :1]).all()  # batches of 3 cut across groups of 4: still one noise per group
    assert not torch.equal(groups[0, 0], groups[1, 0])
    assert not torch.equal(rollout.final[0], rollout.final[1])  # the sampler's own noise still differs


def test_eval_every_minutes_works_without_an_epoch_period(models, tmp_path):
    trainer = Trainer(load_config(CONFIGS["sd"], FAST + [f"model.path={models / 'sd'}", f"output_dir={tmp_path}",
                                                         "eval.every=0", "eval.every_minutes=1"]))
    assert trainer.evaluates and trainer.eval_prompts
    assert not trainer.eval_due(3, elapsed=50) and trainer.eval_due(3, elapsed=61)
    trainer.history.append({"epoch": 3, "geneval_overall": 0.5})
    assert not trainer.eval_due(6, elapsed=100) and trainer.eval_due(6, elapsed=121)
    trainer.cfg.eval.every_minutes = None
    assert not Trainer(trainer.cfg).evaluates  # every=0 alone disables evaluation
