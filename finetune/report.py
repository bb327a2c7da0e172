"""What a training run leaves for people to read: the curves plot and tensorboard's hyperparameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def flat_hparams(tree: dict, prefix: str = "") -> dict:
    """Dotted keys and scalar values, as tensorboard's hparams want them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    # The training reward; objectives that learn from demonstrations have none and show their loss.
    key = next((k for k in ("reward_mean", "hinge", "denoising_loss") if any(k in h for h in history)), "reward_mean")
    train = [h for h in history if key in h]
    epochs, rewards = [h["epoch"] for h in train], np.array([h[key] for h in train])
    axes[0].plot(epochs, rewards, marker=".", alpha=0.4, label="epoch mean")
    if len(rewards) >= 10:  # one epoch's mean is noisy; the trend is what shows learning
        w = max(5, len(rewards) // 10)
        axes[0].plot(epochs[w - 1:], np.convolve(rewards, np.ones(w) / w, mode="valid"), label=f"{w}-epoch mean")
        axes[0].legend()
    axes[0].set(xlabel="epoch", ylabel=f"training {key}", title="reward" if key == "reward_mean" else "loss")
    evals = [h for h in history if "geneval_overall" in h]
    axes[1].errorbar([h["epoch"] for h in evals], [h["geneval_overall"] for h in evals],
                     yerr=[h.get("geneval_overall_se", 0.0) for h in evals], marker="o", capsize=3)
    axes[1].set(xlabel="epoch", ylabel="GenEval overall (eval split)",
                title="held-out GenEval (± image-sampling s.e.)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
