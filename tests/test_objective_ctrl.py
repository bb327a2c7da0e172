"""CTRL: the added condition starts as the base model, the step KL's gradient against its written
formula, the null class that stays the base, a short real run, the saved condition and bad input."""

import json
import math

import pytest
import torch

from finetune import condition
from finetune.models import wrap_pipeline
from finetune.models.sd import ddim_step
from finetune.objectives.ctrl import CTRL
from rewards.size import SizeClassifier
from tests.helpers import FAST, tiny_sd


def test_a_zero_initialised_condition_leaves_the_base_model_unchanged():
    policy = wrap_pipeline(tiny_sd(), 1.0, 3)
    x = torch.randn(3, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = policy.timesteps()[1]
    with torch.no_grad():
        base = policy.predict(x, t, policy.embed(["a", "b", "c"]))
        condition.attach(policy.denoiser, ["small", "large"])
        cond = policy.embed(["a", "b", "c"])
        for label in (0, 1, 2):  # both classes and the null class
            out = policy.predict(x, t, {**cond, "class_labels": torch.full((3,), label)})
            assert torch.equal(out, base)
    assert cond["class_labels"].tolist() == [2, 2, 2]  # the policy samples the null class unless told


def test_step_kl_and_its_gradient_match_the_ddim_formula():
    """KL_t = mean (mu_theta - mu_pre)^2 / (2 sigma_t^2) with mu linear in the predicted eps:
    d mu / d eps = sqrt(1 - abar_prev - sigma^2) - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t)."""
    scheduler = tiny_sd().scheduler
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[4]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_pre = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = (eps_pre + 0.1 * torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)).requires_grad_()
    step = ddim_step(scheduler, eps, t, x, eta=1.0, generator=g)
    reference_mean = ddim_step(scheduler, eps_pre, t, x, eta=1.0, prev_sample=step[0])[2]
    from finetune.models.base import Step

    kl = CTRL().step_kl(Step(*step), reference_mean)
    kl.sum().backward()

    alphas = scheduler.alphas_cumprod.double()
    a_t, a_prev = alphas[int(t)], alphas[int(t) - 100]
    sigma2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    slope = math.sqrt(1 - a_prev - sigma2) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t)
    d = eps[0].numel()
    by_hand = (slope ** 2 * (eps - eps_pre) ** 2).detach().flatten(1).sum(1) / (2 * sigma2 * d)
    # The step computes in float32 (as the sampler does): compare at its precision.
    torch.testing.assert_close(kl.detach().double(), by_hand, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(eps.grad, slope ** 2 * (eps - eps_pre).detach() / (sigma2 * d), rtol=1e-4, atol=1e-7)


def classifier_folder(path, temperature=0.05):
    """A random size classifier, sharpened (a low temperature) so that its log-probs vary across images."""
    torch.manual_seed(1)
    model = SizeClassifier(["small", "medium", "large"], temperature=temperature)
    model.save(path)
    return path


class BrightnessClasses:
    """A differentiable stand-in for a size classifier: log p(y | x0) with logits (-s b, 0, s b), b the
    image's mean brightness minus the base samples' (0.6), so "small" asks for darker and "large" for
    brighter images: a condition the prompts do not express, and one a short run can learn."""

    name, differentiable, classes = "brightness_classes", True, ["small", "medium", "large"]

    def __call__(self, images, prompts, metadata):
        from rewards.base import RewardOutput

        b = 40 * (images.mean((1, 2, 3)) - 0.6)
        log_p = torch.log_softmax(torch.stack([-b, torch.zeros_like(b), b], 1), 1)
        y = torch.tensor([self.classes.index(m["condition"]) for m in metadata])
        return RewardOutput(log_p.gather(1, y[:, None]).squeeze(1), {"accuracy": (log_p.argmax(1) == y).float()})


@pytest.fixture(scope="module")
def ctrl_run(tmp_path_factory):
    """A short real CTRL run on the shipped shapes-sd (a tiny random UNet barely responds to an added
    timestep-embedding offset), rewarded by BrightnessClasses."""
    from finetune.config import load_config
    from finetune.trainer import Trainer

    root = tmp_path_factory.mktemp("ctrl")
    classifier_folder(root / "classifier")
    cfg = load_config("configs/ctrl_shapes_sd.yaml", [
        *FAST, "model.path=shapes-sd", f"output_dir={root / 'run'}",
        f"reward={{name: size_classifier, model: {root / 'classifier'}}}", "sample.groups_per_epoch=8",
        "sample.group_size=2", "sample.batch_size=16", "train.batch_size=16", "train.gradient_accumulation_steps=1",
        "train.epochs=16", "train.lr=1e-2", "objective.embedding_lr=5e-2", "objective.truncated_backprop=false",
        "checkpoint.every=100"])
    trainer = Trainer(cfg)
    policy = trainer.policy
    trainer.reward = BrightnessClasses()
    x = torch.randn(12, *policy.latent_shape(), generator=torch.Generator().manual_seed(5))
    prompts = [f"a photo of a shape number {i}" for i in range(4)] * 3
    labels = torch.arange(3).repeat_interleave(4)
    meta = [{"condition": ["small", "medium", "large"][int(k)]} for k in labels]

    @torch.no_grad()
    def held_out():
        """Mean log p(y | x0) of deterministic samples asked for class y."""
        cond = {**policy.embed(prompts), "class_labels": labels}
        xt = x
        for t in policy.timesteps():
            xt = policy.step(policy.predict(xt, t, cond), t, xt, noise=0.0).prev_sample
        return float(trainer.reward(policy.latents_to_images(xt), prompts, meta).scores.mean())

    before = held_out()
    with policy.reference():
        base = policy.predict(x[:2], policy.timesteps()[0], policy.embed(prompts[:2]))
    history = trainer.train()
    after = held_out()
    with policy.reference():
        reference = policy.predict(x[:2], policy.timesteps()[0], policy.embed(prompts[:2]))
    return {"root": root, "trainer": trainer, "history": history, "before": before, "after": after,
            "base": base, "reference": reference}


def test_ctrl_raises_log_p_of_the_asked_class(ctrl_run):
    history = ctrl_run["history"]
    assert len(history) == 16 and all("log_p" in h and "kl" in h for h in history)
    # Held-out prompts, the same noise, deterministic sampling: measured -1.38 -> -1.20.
    assert ctrl_run["after"] > ctrl_run["before"] + 0.1, (ctrl_run["before"], ctrl_run["after"])


def test_the_null_class_and_the_reference_stay_the_base_model(ctrl_run):
    unet = ctrl_run["trainer"].policy.denoiser
    weight = unet.class_embedding.weight
    assert not weight[-1].any() and weight[:-1].abs().sum() > 0
    torch.testing.assert_close(ctrl_run["reference"], ctrl_run["base"], rtol=0, atol=0)


def test_the_saved_condition_samples_the_asked_class(ctrl_run):
    """`--lora DIR --condition NAME` gives the pipeline's UNet the class labels the trainer's policy used."""
    from finetune.models.hub import load_pipeline

    root, trainer = ctrl_run["root"], ctrl_run["trainer"]
    folder = root / "run" / "lora"
    assert json.loads((folder / "condition.json").read_text())["classes"] == ["small", "medium", "large"]
    assert "ctrl" in (folder / "README.md").read_text()
    pipe = load_pipeline("shapes-sd", lora=folder, condition="large")
    policy = trainer.policy
    x = torch.randn(2, *policy.latent_shape())
    t = policy.timesteps()[1]
    with torch.no_grad():
        cond = policy.embed(["a", "b"])
        ours = policy.predict(x, t, {**cond, "class_labels": torch.tensor([2, 2])})
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["embeds"]).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_ctrl_refuses_bad_input(tmp_path):
    from finetune.config import load_config
    from finetune.models.hub import load_pipeline, merge_lora
    from finetune.preflight import preflight

    cfg = load_config("configs/ctrl_shapes_sd.yaml", [*FAST, "reward=brightness", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="not differentiable: use reward=size_classifier"):
        preflight(cfg)
    classifier_folder(tmp_path / "clf")
    cfg = load_config("configs/ctrl_shapes_sd.yaml", [
        *FAST, f"reward={{name: size_classifier, model: {tmp_path / 'clf'}}}", "objective.classes=[small,huge]",
        f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="objective.classes"):
        preflight(cfg)
    cfg = load_config("configs/ctrl_shapes_sd.yaml", [
        *FAST, f"reward={{name: size_classifier, model: {tmp_path / 'clf'}}}", "lora.enabled=false",
        f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="lora.enabled=true"):
        preflight(cfg)
    with pytest.raises(ValueError, match="needs a LoRA with an added condition"):
        load_pipeline("shapes-sd", condition="large")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "condition.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot hold"):
        merge_lora("shapes-sd", tmp_path / "lora", tmp_path / "merged")
