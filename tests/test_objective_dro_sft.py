"""Diffusion-DRO and the SFT baseline: the hinge's math, the losses on real models against independently
written computations, the lagging policy's states, and short training runs on demonstrations."""

import json

import pytest
import torch
from PIL import Image

from finetune.objectives.dro import dro_hinge
from tests.helpers import FAST, tiny_on_responsive_vae


def test_dro_hinge_and_its_gradient_match_the_written_out_formula():
    torch.manual_seed(0)
    n, m = 12, 0.05
    errors = [torch.rand(n, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    with torch.no_grad():  # a third of the pairs lie past the margin: the expert already leads by more than m
        errors[0][:4] = errors[1][:4] - 0.3
        errors[2][:4] = errors[3][:4]
    loss, d = dro_hinge(*errors, m)
    loss.backward()
    e, e_ref, p, p_ref = (x.detach() for x in errors)
    by_hand = [max(0.0, m + (float(e[i]) - float(e_ref[i])) - (float(p[i]) - float(p_ref[i]))) for i in range(n)]
    assert float(loss.detach()) == pytest.approx(sum(by_hand) / n, rel=1e-12)
    active = torch.tensor([h > 0 for h in by_hand], dtype=torch.float64)
    assert active[:4].sum() == 0 and active[4:].sum() > 0
    # d loss / d L_exp = +1/n where active, d / d L_exp_ref = -1/n, d / d L_pol = -1/n, d / d L_pol_ref = +1/n.
    for error, sign in zip(errors, (1, -1, -1, 1)):
        torch.testing.assert_close(error.grad, sign * active / n)
    torch.testing.assert_close(d, (e - e_ref) - (p - p_ref))


def test_dro_zero_margin_and_equal_models_give_no_gradient():
    e = torch.rand(5, requires_grad=True)
    loss, _ = dro_hinge(e, e.detach(), torch.ones(5), torch.ones(5), 0.0)
    loss.backward()
    assert float(loss.detach()) == 0 and not e.grad.any()


@pytest.fixture(scope="module", params=["sd", "flow"])
def trained_setup(request, tmp_path_factory):
    """A trainer for DRO on a tiny model with a trained LoRA (so that phi differs from the reference)."""
    from finetune.config import load_config
    from finetune.trainer import Trainer

    family = request.param
    root = tmp_path_factory.mktemp(f"dro_{family}")
    tiny_on_responsive_vae(family).save_pretrained(root / "model")
    folder = write_dark_set(root / "expert")
    cfg = load_config("configs/dro_shapes_sd.yaml", [
        *FAST, f"model.path={root / 'model'}", f"output_dir={root / 'run'}", f"data.expert={folder}",
        "lora.enabled=true", "lora.rank=4", "lora.alpha=4", "train.lr=1e-2", "train.ema_decay=0",
        "sample.groups_per_epoch=8", "sample.group_size=1", "train.batch_size=4", "objective.margin=0.01",
        "model.guidance_scale=1.0"])
    trainer = Trainer(cfg)
    with torch.no_grad():
        for p in trainer.params:
            p.add_(0.05 * torch.randn_like(p))
    return trainer


def write_dark_set(root, n=8):
    """Near-black demonstrations of four prompts: what a trained policy should move towards."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.new("RGB", (64, 64), (5 + i, 10, 20)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "prompt": f"a photo of a shape number {i % 4}"}) + "\n")
    return root


def test_dro_collect_records_the_lagging_policys_deterministic_states_and_predictions(trained_setup):
    from finetune.rollout import sample

    trainer = trained_setup
    policy, objective = trainer.policy, trainer.objective
    ctx = trainer.context(0)
    rollout = objective.collect(ctx, [{}] * 8)
    x_t, target, t = rollout.extras["x_t"], rollout.extras["target"], rollout.extras["t"]
    # The same initial noise through the sampler, recorded: each sample's state is its trajectory's
    # state at the drawn step, and the target the policy's conditional output there.
    from finetune.collect import SAMPLING

    gen = ctx.generator(SAMPLING)
    step = torch.randint(len(policy.timesteps()), (8,), generator=gen)
    noise = ctx.noise(8, gen)
    path = sample(policy, rollout.prompts, noise, trajectory=True, stochastic=False, decode=False)
    levels = policy.time_grid()
    for i in range(8):
        k = int(step[i])
        torch.testing.assert_close(x_t[i], path.latents[i, k], rtol=1e-4, atol=1e-5)
        assert float(t[i]) == pytest.approx(float(levels[k]))
        with torch.no_grad():
            output = policy.forward(x_t[i:i + 1], policy.timesteps()[k], {k2: v[i:i + 1] for k2, v in rollout.cond.items()},
                                    guidance=False)
        torch.testing.assert_close(target[i:i + 1], output, rtol=1e-4, atol=1e-5)


def test_dro_loss_equals_an_independent_computation_from_the_denoiser(trained_setup):
    """Expert states noised by the scheduler's own forward process, the denoiser called directly."""
    trainer = trained_setup
    policy, objective = trainer.policy, trainer.objective
    rollout = objective.collect(trainer.context(1), [{}] * 8)
    batch = next(iter(objective.batches(trainer.context(1), rollout, torch.zeros(8))))
    x0, eps, t, cond = batch["x0"], batch["eps"], batch["t"], batch["cond"]
    net = policy.denoiser

    def output(x, level):
        if policy.family == "sd":
            timestep = (level * 999).round().long()
            return net(x, timestep, cond["embeds"]).sample
        return net(x, cond["embeds"], cond["pooled"], level * 1000).sample

    def expert_state_and_target():
        if policy.family == "sd":
            timestep = (t * 999).round().long()
            return policy.pipe.scheduler.add_noise(x0, eps, timestep), eps
        s = t.reshape(-1, 1, 1, 1)
        return (1 - s) * x0 + s * eps, eps - x0

    x_exp, target_exp = expert_state_and_target()
    per_sample = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)  # noqa: E731
    with torch.no_grad():
        errors = [per_sample(output(x_exp, t), target_exp), per_sample(output(batch["x_t"], t), batch["target"])]
        net.disable_adapters()
        refs = [per_sample(output(x_exp, t), target_exp), per_sample(output(batch["x_t"], t), batch["target"])]
        net.enable_adapters()
    d = (errors[0] - refs[0]) - (errors[1] - refs[1])
    expected = torch.clamp(d + objective.margin, min=0).mean()
    policy.net = policy.denoiser
    loss, info = objective.loss(policy, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(info["d"], d.mean(), rtol=1e-4, atol=1e-7)


def test_with_theta_equal_to_phi_the_policy_term_only_sets_the_hinge_threshold(trained_setup):
    """At the official sync interval the loss is always computed with phi = theta (the lagging copy was
    synced at the last optimizer step), so L_pol(phi) = 0 and its gradient vanishes: the gradient is
    that of the expert errors of the active pairs, (1/n) sum_active grad L_exp(phi)."""
    from finetune.objectives.dro import squared_error

    trainer = trained_setup
    policy, objective = trainer.policy, trainer.objective
    rollout = objective.collect(trainer.context(2), [{}] * 8)
    batch = next(iter(objective.batches(trainer.context(2), rollout, torch.zeros(8))))
    policy.net = policy.denoiser
    loss, info = objective.loss(policy, batch)
    assert float(info["policy_error"]) < 1e-10
    grads = torch.autograd.grad(loss, trainer.params, allow_unused=True)
    x0, eps, t = batch["x0"], batch["eps"], batch["t"]
    x_exp = policy.noised(x0, eps, t)
    with torch.no_grad(), policy.reference():
        ref_exp = squared_error(objective.predict(policy, x_exp, t, batch["cond"]), policy.target(x0, eps, t))
        ref_pol = squared_error(objective.predict(policy, batch["x_t"], t, batch["cond"]), batch["target"])
    expert = squared_error(objective.predict(policy, x_exp, t, batch["cond"]), policy.target(x0, eps, t))
    active = ((expert.detach() - ref_exp) + ref_pol + objective.margin > 0).float()
    assert 0 < active.sum()
    expected = torch.autograd.grad((active * expert).sum() / len(active), trainer.params, allow_unused=True)
    for g, e in zip(grads, expected):
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-8)


def test_sft_loss_is_the_pretraining_loss():
    from diffusers.utils.torch_utils import randn_tensor

    from finetune.models.sd import SDPolicy
    from finetune.objectives.sft import SFT

    torch.manual_seed(0)
    policy = SDPolicy(tiny_on_responsive_vae("sd"), 1.0, 3, 1.0)
    cond = policy.embed(["a photo of a circle", "a photo of two squares"])
    x0 = torch.randn(2, *policy.latent_shape())
    eps = randn_tensor(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.9])
    loss, _ = SFT().loss(policy, {"x0": x0, "eps": eps, "t": t, "cond": cond})
    timestep = (t * 999).round().long()
    with torch.no_grad():
        pred = policy.denoiser(policy.pipe.scheduler.add_noise(x0, eps, timestep), timestep, cond["embeds"]).sample
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(pred, eps), rtol=1e-5, atol=1e-7)


def test_sft_training_times_follow_the_family_default():
    from types import SimpleNamespace

    from finetune.objectives.sft import SFT

    gen = torch.Generator().manual_seed(0)
    uniform = SFT().training_times(SimpleNamespace(family="sd"), 20000, gen)
    logit_normal = SFT().training_times(SimpleNamespace(family="flow"), 20000, gen)
    assert uniform.shape == (1, 20000)
    # Uniform: a quarter of the mass below 0.25; logit-normal: concentrated in the middle (~16 %).
    assert float((uniform < 0.25).float().mean()) == pytest.approx(0.25, abs=0.02)
    assert float((logit_normal < 0.25).float().mean()) == pytest.approx(0.137, abs=0.02)


@pytest.mark.parametrize("objective", ["sft", "dro"])
def test_training_on_demonstrations_moves_the_samples_towards_them(tmp_path, objective):
    """A short real run. Its reward: minus the squared distance of the deterministic samples' latents
    to the demonstrations' mean latent (the tiny VAE decodes flat images to near-equal brightness,
    so a pixel reward would not see the move)."""
    from finetune.config import load_config
    from finetune.rollout import sample
    from finetune.trainer import Trainer

    tiny_on_responsive_vae("sd").save_pretrained(tmp_path / "model")
    folder = write_dark_set(tmp_path / "expert")
    cfg = load_config(f"configs/{objective}_shapes_sd.yaml", [
        *FAST, f"model.path={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}", f"data.expert={folder}",
        "train.lr=1e-2", "train.ema_decay=0",  # full fine-tuning, as the recipes
        "sample.groups_per_epoch=8", "sample.group_size=1", "train.batch_size=8", "train.epochs=12",
        "objective.prompt_dropout=0.0", "model.guidance_scale=1.0"])
    trainer = Trainer(cfg)
    policy, expert = trainer.policy, trainer.objective.expert
    prompts = [f"a photo of a shape number {i % 4}" for i in range(8)]
    noise = torch.randn(8, *policy.latent_shape(), generator=torch.Generator().manual_seed(5))
    expert.encode(policy)
    centre = expert.latents(policy, list(range(len(expert)))).mean(0)

    def reward():
        return -float(((sample(policy, prompts, noise, stochastic=False, decode=False).final - centre) ** 2).mean())

    before = reward()
    history = trainer.train()
    after = reward()
    assert len(history) == 12 and "reward_mean" not in history[-1]
    assert after > 0.8 * before, (before, after)  # measured: 14.0 -> 3.8 (sft), 14.0 -> 9.8 (dro)
    assert (tmp_path / "run" / "model" / "model_index.json").exists()


def test_dro_and_sft_refuse_bad_options():
    from finetune.objectives import build_objective

    with pytest.raises(ValueError, match="objective.margin"):
        build_objective("dro", "sd", margin=-1)
    with pytest.raises(ValueError, match="objective.prompt_dropout"):
        build_objective("sft", "sd", prompt_dropout=1.0)
    with pytest.raises(ValueError, match="objective.time_sampling"):
        build_objective("sft", "flow", time_sampling="cosine")
