"""A learned initial-noise distribution: prompt -> N(mu(c), diag sigma(c)^2) over the sampler's x_T.

FIND (``objective.name: find``) trains it with the diffusion model frozen; ``diffrl sample`` and
``diffrl eval geneval`` take the saved folder with ``--noise-policy DIR``. A draw is the standard
noise eps that would otherwise start the sampler, moved and scaled: x_T = mu(c) + sigma(c) * eps, so
a seeded image keeps its seed's noise and only the distribution around it changes.

The prompt enters as its text-encoder output: the token embeddings averaged over positions,
followed by the pooled embedding where the family has one (SD3, FLUX). The last layer starts at
zero, so an untrained policy is exactly N(0, I), the base model's own sampling.

The module also holds FIND's reward predictor g (its dynamic reward calibration): an MLP on the
prompt features and the current distribution (mu, sigma), trained to predict the reward of a draw.
Its inputs are detached, so it never moves the distribution; inference does not use it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS, CONFIG = "noise_policy.safetensors", "noise_policy.json"


def prompt_features(cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, D): token embeddings averaged over positions, then the pooled embedding if there is one."""
    parts = [cond["embeds"].float().mean(1)]
    if "pooled" in cond:
        parts.append(cond["pooled"].float())
    return torch.cat(parts, 1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_std)^2) per sample, averaged over the latent's elements (as the sampler steps' log-probs)."""
    z = (x - mean) * torch.exp(-log_std)
    per_element = -0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    return per_element.flatten(1).mean(1)


def mlp(sizes: list[int], activation=nn.SiLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class NoisePolicy(nn.Module):
    def __init__(self, feature_dim: int, latent_shape: tuple[int, ...], hidden: int = 256,
                 calibrator_hidden: int = 256):
        super().__init__()
        self.config = {"feature_dim": feature_dim, "latent_shape": list(latent_shape), "hidden": hidden,
                       "calibrator_hidden": calibrator_hidden}
        self.latent_shape = tuple(latent_shape)
        size = math.prod(latent_shape)
        self.net = mlp([feature_dim, hidden, hidden, 2 * size])
        nn.init.zeros_(self.net[-1].weight)  # start at N(0, I): the base model's own sampling
        nn.init.zeros_(self.net[-1].bias)
        # FIND's reward predictor g(mu, sigma, c): three ReLU layers of 256, as in the official code.
        self.calibrator = mlp([feature_dim + 2 * size, *[calibrator_hidden] * 3, 1], nn.ReLU)

    def distribution(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std), each (B, *latent_shape)."""
        mean, log_std = self.net(features).chunk(2, dim=1)
        return mean.reshape(-1, *self.latent_shape), log_std.reshape(-1, *self.latent_shape)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, log_std, predicted reward): one call, so a distributed wrapper sees every parameter used."""
        mean, log_std = self.distribution(features)
        state = torch.cat([features, mean.detach().flatten(1), log_std.detach().exp().flatten(1)], 1)
        return mean, log_std, self.calibrator(state).squeeze(1)

    @torch.no_grad()
    def initial_latents(self, cond: dict[str, torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
        """x_T = mu(c) + sigma(c) * eps for standard noise ``eps`` of the prompts in ``cond``."""
        if tuple(eps.shape[1:]) != self.latent_shape:
            raise ValueError(f"the noise policy was trained for latents of shape {self.latent_shape}, but this "
                             f"model samples {tuple(eps.shape[1:])}: use the model (and model.resolution) it was "
                             "trained with")
        features = prompt_features(cond)
        if features.shape[1] != self.config["feature_dim"]:
            trained_on = getattr(self, "info", {}).get("base_model", "another model")
            raise ValueError(f"the noise policy reads {self.config['feature_dim']} prompt features, this model's "
                             f"text encoders give {features.shape[1]}: it was trained on {trained_on}; use that model")
        weight = self.net[0].weight
        mean, log_std = self.distribution(features.to(weight.device, weight.dtype))
        return (mean + log_std.exp() * eps.to(mean)).to(eps)

    def save(self, folder: str | Path, info: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps({**self.config, **(info or {})}, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device=None) -> NoisePolicy:
        folder = Path(folder)
        if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
            raise FileNotFoundError(f"--noise-policy {folder}: expected {WEIGHTS} and {CONFIG} there (a FIND run "
                                    "writes them to output_dir/noise_policy)")
        config = json.loads((folder / CONFIG).read_text())
        policy = cls(config["feature_dim"], tuple(config["latent_shape"]), config["hidden"],
                     config["calibrator_hidden"])
        policy.load_state_dict(load_file(folder / WEIGHTS))
        policy.info = config
        return policy.to(device).eval()
