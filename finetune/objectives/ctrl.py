"""CTRL: Adding Conditional Control to Diffusion Models with Reinforcement Learning (Zhao et al.,
2024; official code zhaoyl18/CTRL).

A condition y the base model p_pre(x | c) does not have (here: object size) is added from an offline
labelled dataset: a classifier p(y | x0) is learned on it, and the model conditioned on y,
p_theta(x | c, y), is fine-tuned to maximise the KL-regularised objective the paper derives,

    J(theta) = E_{y, x_{T:0} ~ p_theta(. | c, y)} [ log p(y | x_0) ]
               - alpha * sum_t E[ KL( p_theta(x_{t-1} | x_t, c, y) || p_pre(x_{t-1} | x_t, c) ) ],

whose optimum is the conditional p_pre(x_0 | c) p(y | x_0)^(1 / alpha) / Z. With DDIM steps of equal
std sigma_t the step KL is || mu_theta - mu_pre ||^2 / (2 sigma_t^2). As in the official code:

    L = w_r * mean[ -log p(y | x_0) ] + w_kl * mean[ sum_t mean_elements (mu_theta - mu_pre)^2 / (2 sigma_t^2) ]

with w_r = 0.1 (its ``loss_coeff``) and w_kl = 0.01 (``kl_weight``), backpropagated through the
classifier, the VAE decoder and the sampler (DDIM, eta 1), truncated at random: at step i (0 = the
noisiest) a K ~ U{0, ..., T} is drawn and step i's predictions (fine-tuned and pre-trained) are
detached when i < K, so step i keeps its gradient with probability (i + 1) / (T + 1)
(``truncated_backprop: false`` keeps every step's).

The condition enters as a zero-initialised class embedding added to the UNet's timestep embedding,
with a null class whose row stays zero (its gradient is masked): the reference p_pre is the model
with the LoRA disabled and the null class, exactly the base. LoRA on the attention projections
(``lora.rank`` 4, the diffusers default the official code relies on) and the embedding are trained
with AdamW (weight decay 0.1), learning rates 1e-3 (``train.lr``) and 1e-2 (``embedding_lr``), clipped
at norm 5; each sample's class is drawn uniformly.

Departures (recipe configs/ctrl_shapes_sd.yaml): the shapes world's size classifier as p(y | x_0)
(official: compressibility and aesthetic classes of SD 1.5 images); ``model.num_steps`` DDIM steps
(official 50); classifier-free-guidance-free sampling on the CFG-free shapes models (with guidance > 1
the unconditional branch is the empty prompt with the null class, as in the official code); one
process (gradients through several sampler steps per loss do not fit DDP's one-forward contract yet).
"""

from __future__ import annotations

import torch

from finetune import condition, distributed
from finetune.batches import minibatch_indices
from finetune.collect import BATCHES, SAMPLING, EpochContext
from finetune.models.base import select
from finetune.objectives.base import Objective
from finetune.rollout import Rollout


class CTRL(Objective):
    paper = "Zhao et al. 2024, CTRL"
    families = ("sd",)
    needs = ()
    uses_reward = False  # the reward is differentiated inside ``loss``, not scored at rollout

    def __init__(self, classes: tuple[str, ...] = ("small", "medium", "large"), reward_weight: float = 0.1,
                 kl_weight: float = 0.01, embedding_lr: float = 1e-2, truncated_backprop: bool = True):
        if len(set(classes)) != len(classes) or condition.NULL in classes or not classes:
            raise ValueError(f"objective.classes must be distinct names other than {condition.NULL!r}, got {classes}")
        self.classes = list(classes)
        self.reward_weight = reward_weight
        self.kl_weight = kl_weight
        self.embedding_lr = embedding_lr
        self.truncated_backprop = truncated_backprop  # False: every step keeps its gradient
        self.reward = None

    @property
    def needs_reference(self) -> bool:
        return True

    def check_batching(self, cfg) -> None:
        super().check_batching(cfg)
        if not cfg.lora.enabled:
            raise ValueError("objective ctrl trains a LoRA beside its condition embedding (saved together in "
                             "output_dir/lora): set lora.enabled=true")

    def check_reward(self, reward) -> None:
        if not getattr(reward, "differentiable", False):
            raise ValueError(f"objective ctrl backpropagates through the reward, but reward {reward.name!r} is not "
                             "differentiable: use reward=size_classifier (or another differentiable reward)")
        known = getattr(reward, "classes", None)
        if known is not None and set(self.classes) - set(known):
            raise ValueError(f"objective.classes {self.classes} are not all classes of reward {reward.name!r} "
                             f"({', '.join(known)}): set objective.classes to some of them")

    def trained_module(self, policy):
        self.unet = policy.denoiser
        embedding = condition.attach(policy.denoiser, self.classes)
        embedding.requires_grad_(True)
        keep = torch.ones(len(self.classes) + 1, 1, device=embedding.weight.device)
        keep[-1] = 0  # the null class stays the base model's "no condition"
        embedding.weight.register_hook(lambda grad: grad * keep)
        return policy.denoiser

    def param_groups(self, module, lr):
        embedding = list(module.class_embedding.parameters())
        lora = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("class_embedding")]
        return [{"params": lora, "lr": lr}, {"params": embedding, "lr": self.embedding_lr}]

    def collect(self, ctx: EpochContext, records: list[dict]) -> Rollout:
        """Prompts, a uniformly drawn class per sample and the initial noise; sampling happens in ``loss``."""
        if ctx.accelerator.num_processes > 1:
            raise NotImplementedError("objective ctrl trains on one process for now: launch it without "
                                      "--num_processes (its loss calls the UNet once per sampler step)")
        self.reward = ctx.reward
        gen = ctx.generator(SAMPLING)
        k = torch.randint(len(self.classes), (len(records),), generator=gen)
        prompts = [r["prompt"] for r in records]
        return Rollout(prompts=prompts, metadata=[{**r, "condition": self.classes[i]} for r, i in zip(records, k)],
                       noise=ctx.noise(len(records), gen), final=None, images=None, cond=ctx.policy.embed(prompts),
                       extras={"labels": k.to(ctx.accelerator.device)})

    def batches(self, ctx: EpochContext, rollout: Rollout, advantages: torch.Tensor):
        gen = ctx.generator(BATCHES)
        distributed.set_accumulation(ctx.accelerator, ctx.cfg.train.gradient_accumulation_steps)
        for idx in minibatch_indices(ctx, len(rollout), gen):
            yield {"x_T": rollout.noise[idx], "cond": select(rollout.cond, idx.to(rollout.noise.device)),
                   "labels": rollout.extras["labels"][idx], "prompts": [rollout.prompts[i] for i in idx],
                   "metadata": [rollout.metadata[i] for i in idx], "generator": gen}

    def step_kl(self, step, reference_mean: torch.Tensor) -> torch.Tensor:
        """Per-sample || mu_theta - mu_pre ||^2 / (2 sigma_t^2), averaged over latent elements."""
        var = step.std_dev_t.reshape(-1).expand(len(reference_mean)) ** 2
        dims = tuple(range(1, reference_mean.ndim))
        squared = ((step.prev_sample_mean - reference_mean) ** 2).mean(dim=dims)
        return torch.where(var > 0, squared / (2 * var.clamp(min=1e-20)), torch.zeros_like(squared))

    def loss(self, policy, batch: dict) -> tuple[torch.Tensor, dict]:
        """Sample from x_T with the class labels, gradients through the (randomly truncated) chain."""
        x, gen = batch["x_T"], batch["generator"]
        labels = batch["labels"]
        cond = {**batch["cond"], "class_labels": labels}
        reference_cond = {**batch["cond"], "class_labels": torch.full_like(labels, len(self.classes))}
        timesteps = policy.timesteps()
        kl = torch.zeros(len(x), device=x.device)
        kept = 0
        for i, t in enumerate(timesteps):
            keep = not self.truncated_backprop or i >= int(torch.randint(0, len(timesteps) + 1, (1,), generator=gen))
            kept += keep
            with torch.set_grad_enabled(keep):
                output = policy.predict(x, t, cond)
                with policy.reference():
                    reference = policy.predict(x, t, reference_cond)
            step = policy.step(output, t, x, generator=gen)
            reference_mean = policy.step(reference, t, x, prev_sample=step.prev_sample).prev_sample_mean
            kl = kl + self.step_kl(step, reference_mean)
            x = step.prev_sample
        images = policy.latents_to_images(x)
        log_p = self.reward(images, batch["prompts"], batch["metadata"])
        loss = self.reward_weight * (-log_p.scores).mean() + self.kl_weight * kl.mean()
        if not kept:  # every step drawn detached (probability 10!/11^10 at 10 steps): a zero gradient
            loss = loss + 0 * self.unet.class_embedding.weight.sum()
        return loss, {"log_p": log_p.scores.detach().mean(), "kl": kl.detach().mean(),
                      "classifier_accuracy": log_p.info["accuracy"].mean(), "steps_with_gradient": float(kept)}

    def export(self, folder, card):
        from finetune.model_card import write_model_card

        policy_folder = folder / "lora"
        condition.save(self.unet, policy_folder)
        classes = ", ".join(self.classes)
        usage = (f"diffrl sample --model {card['base_model']} --lora {policy_folder} --condition {self.classes[-1]} "
                 f"--metadata prompts.jsonl --out samples   # classes: {classes} (null: none)")
        write_model_card(policy_folder, f"Added condition ({classes}) with CTRL", card, usage, ["ctrl", "lora"])
