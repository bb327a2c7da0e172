"""FIND: Fine-tuning Initial Noise Distribution with policy optimisation (Chen et al., ACM MM 2024;
official code vpx-ecnu/FIND).

The diffusion model stays frozen. What is learned is the distribution the sampler starts from:
generation from a prompt c is a one-step MDP whose action is the initial latent

    x_T ~ pi_theta(. | c) = N(mu_theta(c), diag sigma_theta(c)^2),      x_0 = ODE(x_T, c),      r = R(x_0, c)

with the deterministic sampler (DDIM eta 0 / Euler), so the reward depends on x_T alone. The
policy is trained with a clipped ratio over the samples of the last ``history`` epochs (its
"historical data"), calibrated rewards and a pull towards N(0, I):

    rho       = pi_theta(x_T | c) / pi_old(x_T | c)                 (log pi averaged over latent elements)
    A         = r - g(mu_theta(c), sigma_theta(c), c)               (dynamic reward calibration)
    L_policy  = E[ max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) ]
    R(mu, s)  = E[ mu^2 + (sigma - 1)^2 ]                           (regulariser towards N(0, I))
    L_g       = E[ (g(mu, sigma, c) - r)^2 ]                        (g's inputs detached)
    L         = w_r L_policy + w_reg R + L_g

g is a learned predictor of the reward the current distribution earns on prompt c (an MLP on the
prompt features and the detached mu, sigma: three ReLU layers of 256, as in the official code);
A = r - g is the reward relative to what the distribution was expected to earn. Defaults follow the
official code: eps = 0.2, w_r = 10, w_reg = 0.01, policy lr 1e-3 (``train.lr``), g's lr 1e-4, both
AdamW, the distribution starting at exactly N(0, I).

Where this file chooses (the paper's method section and its code differ, or the code is per prompt):
* pi_theta is a network of the prompt embedding (finetune/noise_policy.py), so the trained
  distribution applies to held-out prompts; the official code learns one free (mu, sigma) per
  prompt, with sigma stored directly and clamped at 1e-4 (here: log sigma, no clamp needed);
* pi_old is the policy that drew each sample (its log-prob is recorded at rollout), as PPO and the
  paper's "historical data" need. The official code keeps the initial N(0, I) as pi_old and never
  updates it, so rho saturates as soon as the distribution has moved and learning stops;
* PPO's pessimistic min of the clipped and unclipped terms (the shared ``clipped_surrogate``), where
  the official code multiplies A by clip(rho) alone;
* rollouts use the deterministic sampler, as evaluation does (the official code samples with DDIM
  eta 1, which makes the reward a noisy function of x_T); the regulariser is the official code's
  squared distance of (mu, sigma) from (0, 1), which its paper calls a KL.
"""

from __future__ import annotations

import torch

from finetune import distributed
from finetune.batches import minibatch_indices
from finetune.collect import BATCHES, SAMPLING, EpochContext
from finetune.noise_policy import NoisePolicy, gaussian_log_prob, prompt_features
from finetune.objectives.base import Objective, clipped_surrogate
from finetune.rollout import Rollout, concat, sample

KEYS = ("features", "x_T", "old_log_prob", "rewards")


class FIND(Objective):
    paper = "Chen et al. 2024, FIND"
    needs = ()
    deterministic_rollouts = True
    trains_denoiser = False

    def __init__(self, clip_range: float = 0.2, reward_weight: float = 10.0, reg_weight: float = 0.01,
                 calibrator_lr: float = 1e-4, history: int = 4, hidden: int = 256):
        self.clip_range = clip_range
        self.reward_weight = reward_weight
        self.reg_weight = reg_weight
        self.calibrator_lr = calibrator_lr
        self.history = history
        self.hidden = hidden
        self.buffer: list[dict[str, torch.Tensor]] = []  # the last `history` epochs' samples, oldest first
        self.module: NoisePolicy | None = None
        self.calibrated = False  # g starts at the first epoch's mean reward (``advantages``)

    def check_batching(self, cfg) -> None:
        super().check_batching(cfg)
        if cfg.lora.enabled:
            raise ValueError("objective find trains the initial-noise policy and keeps the denoiser frozen: "
                             "set lora.enabled=false")
        if self.history < 1:
            raise ValueError(f"objective.history must be >= 1 epoch of samples, got {self.history}")

    def trained_module(self, policy) -> NoisePolicy:
        feature_dim = prompt_features(policy.encode([""])).shape[1]
        self.module = NoisePolicy(feature_dim, policy.latent_shape(), self.hidden).to(policy.device)
        return self.module

    def param_groups(self, module, lr):
        return [{"params": list(module.net.parameters()), "lr": lr},
                {"params": list(module.calibrator.parameters()), "lr": self.calibrator_lr}]

    def signal_parameters(self) -> list[torch.nn.Parameter]:
        """The distribution's parameters, without g's (``diffrl diagnose snr`` measures these)."""
        return list(self.module.net.parameters())

    def initial_latents(self, policy, prompts, eps):
        return self.module.initial_latents(policy.embed(prompts), eps)

    @torch.no_grad()
    def collect(self, ctx: EpochContext, records: list[dict]) -> Rollout:
        """Draw x_T from the current distribution, sample deterministically from it, score."""
        s, acc = ctx.cfg.sample, ctx.accelerator
        gen = ctx.generator(SAMPLING)
        parts = []
        for i in range(0, len(records), s.batch_size):
            chunk = records[i:i + s.batch_size]
            prompts = [r["prompt"] for r in chunk]
            features = prompt_features(ctx.policy.embed(prompts)).to(acc.device)
            mean, log_std = self.module.distribution(features)
            x_T = mean + log_std.exp() * ctx.noise(len(chunk), gen)
            with distributed.autocast(acc):
                ro = sample(ctx.policy, prompts, x_T, chunk, stochastic=False)
            ro.rewards, ro.reward_info = ctx.score(ro.images, ro.prompts, ro.metadata)
            ro.images = None
            ro.extras = {"features": features, "old_log_prob": gaussian_log_prob(x_T, mean, log_std)}
            parts.append(ro)
        return concat(parts)

    def advantages(self, ctx, prompts, rewards):
        """The rewards themselves: they are calibrated against g in ``loss``, where g is current.

        Before the first update g predicts the first epoch's mean reward (all processes' rewards, so
        every process sets the same value): a g that starts near 0 on a reward in [0, 1] would give
        every sample the same positive advantage and shrink sigma for nothing."""
        if not self.buffer and not self.calibrated:
            last = self.module.calibrator[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.fill_(float(rewards.float().mean()))
            self.calibrated = True
        return rewards.float()

    def batches(self, ctx: EpochContext, rollout: Rollout, advantages: torch.Tensor):
        """Minibatches over this epoch's samples and those of the ``history - 1`` epochs before it."""
        self.buffer = (self.buffer + [{"features": rollout.extras["features"], "x_T": rollout.noise,
                                       "old_log_prob": rollout.extras["old_log_prob"],
                                       "rewards": advantages}])[-self.history:]
        device = rollout.noise.device  # a resumed buffer comes back on the CPU
        data = {k: torch.cat([epoch[k].to(device) for epoch in self.buffer]) for k in KEYS}
        distributed.set_accumulation(ctx.accelerator, ctx.cfg.train.gradient_accumulation_steps)
        for idx in minibatch_indices(ctx, len(data["x_T"]), ctx.generator(BATCHES)):
            yield {k: v[idx.to(device)] for k, v in data.items()}

    def loss(self, policy, batch: dict) -> tuple[torch.Tensor, dict]:
        """``batch``: features, x_T, old_log_prob and rewards, batch-first."""
        mean, log_std, predicted = self.net(batch["features"])
        log_prob = gaussian_log_prob(batch["x_T"], mean, log_std)
        ratio = torch.exp(log_prob - batch["old_log_prob"])
        A = batch["rewards"] - predicted.detach()
        policy_loss = clipped_surrogate(A, ratio, self.clip_range)
        regulariser = (mean ** 2 + (log_std.exp() - 1) ** 2).mean()
        calibration = ((predicted - batch["rewards"]) ** 2).mean()
        loss = self.reward_weight * policy_loss + self.reg_weight * regulariser + calibration
        return loss, {"policy_loss": policy_loss.detach(), "regulariser": regulariser.detach(),
                      "calibration_mse": calibration.detach(), "advantage_mean": A.mean(),
                      "clipfrac": ((ratio - 1).abs() > self.clip_range).float().mean(),
                      "sigma_mean": log_std.detach().exp().mean(), "mu_rms": mean.detach().pow(2).mean().sqrt()}

    def export(self, folder, card):
        from finetune.model_card import write_model_card

        target = folder / "noise_policy"
        self.module.save(target, {"base_model": card["base_model"], "guidance_scale": card["guidance_scale"]})
        usage = (f"diffrl eval geneval --model {card['base_model']} --noise-policy {target} "
                 f"--guidance {card['guidance_scale']} --out eval-find\n"
                 f"diffrl sample --model {card['base_model']} --noise-policy {target} --metadata prompts.jsonl "
                 "--out samples")
        write_model_card(target, "Initial-noise policy (FIND)", card, usage, ["find", "noise-policy"])

    def state_dict(self):
        return {f"buffer.{i}.{k}": v for i, epoch in enumerate(self.buffer) for k, v in epoch.items()}

    def load_state_dict(self, state):
        epochs = sorted({int(key.split(".")[1]) for key in state if key.startswith("buffer.")})
        self.buffer = [{k: state[f"buffer.{i}.{k}"] for k in KEYS} for i in epochs]
        self.calibrated = True
