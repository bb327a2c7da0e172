"""Which advantage estimator gives the policy gradient most signal? Measured on the same samples.

At the start of an epoch (theta = theta_old) the clipped surrogate's gradient is linear in the
advantages: g = -1/n sum_i A_i grad log p(sample i), the log-prob summed over the trained steps.
So one pass that keeps each sample's gradient G_i serves every estimator: for each epoch,

    g_scheme = sum_i A_i^scheme G_i

and the gradient SNR of each scheme is the mean cosine between the g of independent epochs
(finetune/diagnostics.py). The estimators compared are the ones the sampler-step objectives use:

* ``none``: the raw reward (REINFORCE without a baseline);
* ``batch``: (r - batch mean) / batch std (DDPO's reference once per-prompt buffers are empty);
* ``group``: (r - group mean) / group std (GRPO; DDPO with per-epoch groups);
* ``leave_one_out``: r_i - mean of the other K - 1 of its group (LOOP).

    python launch/snr_advantages.py --config configs/demo/ddpo_shapes_sd.yaml --epochs 10

Prints the table (cosine ± jackknife s.e. per scheme) and writes it to ``--out``/snr_advantages.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def advantage_schemes(rewards: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    from finetune.advantages import group_normalize, leave_one_out

    return {
        "none": rewards,
        "batch": group_normalize(rewards, len(rewards), eps=1e-4),  # the whole batch as one group
        "group": group_normalize(rewards, group_size, eps=1e-4),
        "leave_one_out": leave_one_out(rewards, group_size),
    }


def per_sample_gradients(trainer, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, P) gradients of each sample's summed log-prob over its trained steps; (n,) rewards."""
    from finetune.batches import step_batch
    from finetune.diagnostics import flat_grad

    rollout, _, _ = trainer.collect(epoch)
    lo, hi = trainer.cfg.train.get("timestep_range") or (0, rollout.log_probs.shape[1])
    policy, rows = trainer.policy, []
    policy.net = policy.denoiser
    for i in range(len(rollout)):
        for p in trainer.params:
            p.grad = None
        for k in range(lo, hi):
            if not rollout.stochastic_steps[i, k]:
                continue
            batch = step_batch(rollout, torch.zeros(len(rollout)), torch.tensor([i]), torch.tensor([k]))
            step = policy.step(policy.predict(batch["x_t"], batch["t"], batch["cond"]), batch["t"], batch["x_t"],
                               prev_sample=batch["x_prev"])
            step.log_prob.sum().backward()
        rows.append(flat_grad(trainer.params))
    for p in trainer.params:
        p.grad = None
    return torch.stack(rows), rollout.rewards.float().cpu()


def main() -> None:
    from finetune.config import load_config
    from finetune.diagnostics import snr
    from finetune.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--epochs", type=int, default=10, help="independent epochs (pairs: n(n-1)/2)")
    ap.add_argument("--out", default="runs/snr_advantages")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["eval.every=0", "log.tensorboard=false", "resume=false",
                                    f"output_dir={args.out}", *args.overrides])
    trainer = Trainer(cfg)
    if "trajectory" not in trainer.objective.needs:
        raise SystemExit(f"{args.config}: needs a sampler-step objective (ddpo, flow_grpo, loop)")
    gradients: dict[str, list[torch.Tensor]] = {}
    means = []
    for e in range(args.epochs):
        G, rewards = per_sample_gradients(trainer, 1000 + e)
        means.append(float(rewards.mean()))
        for name, A in advantage_schemes(rewards.double(), cfg.sample.group_size).items():
            gradients.setdefault(name, []).append((A.float() @ G) / len(A))
        print(f"epoch {e}: mean reward {means[-1]:.3f}", flush=True)
    n = cfg.sample.groups_per_epoch * cfg.sample.group_size
    results = {name: snr(g, n) for name, g in gradients.items()}
    print(f"{args.config}: {n} samples per epoch, {args.epochs} epochs; mean cosine between epoch gradients")
    for name, r in results.items():
        print(f"  {name:14s} {r['mean_cos']:+.3f} ± {r['cos_sem']:.3f}   samples for SNR 1: {r['samples_for_snr_1']:.0f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "snr_advantages.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "samples_per_epoch": n, "epochs": args.epochs,
         "reward_means": means, "schemes": {k: {x: v for x, v in r.items() if x != "cosines"}
                                             for k, r in results.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
