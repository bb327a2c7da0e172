"""launch/snr_advantages.py: per-sample gradients combined with an estimator's advantages give the
objective's own epoch gradient, and the estimators are the written-out formulas."""

import torch

from finetune.config import load_config
from finetune.diagnostics import epoch_gradient
from finetune.trainer import Trainer
from tests.helpers import FAST, load_launch_script, save_tiny_models


def test_schemes_by_hand():
    script = load_launch_script("snr_advantages.py")
    r = torch.tensor([1.0, 3.0, 0.0, 4.0], dtype=torch.float64)
    A = script.advantage_schemes(r, 2)
    torch.testing.assert_close(A["none"], r)
    torch.testing.assert_close(A["batch"], (r - 2.0) / (r.std() + 1e-4))
    s = 2 ** 0.5  # unbiased std of {1, 3}; of {0, 4} it is 2 * sqrt(2)
    torch.testing.assert_close(A["group"], torch.tensor([-1 / (s + 1e-4), 1 / (s + 1e-4), -2 / (2 * s + 1e-4),
                                                         2 / (2 * s + 1e-4)], dtype=torch.float64))
    torch.testing.assert_close(A["leave_one_out"], torch.tensor([-2.0, 2.0, -4.0, 4.0], dtype=torch.float64))


def test_per_sample_gradients_recombine_into_the_loop_epoch_gradient(tmp_path):
    script = load_launch_script("snr_advantages.py")
    models = save_tiny_models(tmp_path / "models")
    cfg = load_config("configs/loop_shapes_sd.yaml", FAST + [
        f"model.path={models / 'sd'}", f"output_dir={tmp_path / 'run'}", "sample.groups_per_epoch=2",
        "sample.group_size=4", "train.batch_size=8", "objective.clip_range=0.2"])
    trainer = Trainer(cfg)
    G, rewards = script.per_sample_gradients(trainer, 3)
    assert G.shape == (8, sum(p.numel() for p in trainer.params))
    combined = script.advantage_schemes(rewards.double(), 4)["leave_one_out"].float() @ G
    objective_gradient, _ = epoch_gradient(trainer, 3)  # the same epoch: the same samples
    cos = torch.nn.functional.cosine_similarity(combined, objective_gradient, dim=0)
    assert cos < -0.999  # the loss descends along +A grad log p: its gradient is the opposite direction
