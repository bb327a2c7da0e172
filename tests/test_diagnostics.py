"""The gradient signal-to-noise diagnostic: its estimator on synthetic gradients, then on a real trainer."""

import pytest
import torch

from finetune.diagnostics import epoch_gradient, epoch_step_gradients, snr


@pytest.mark.parametrize("rho", [0.01, 0.1])
def test_snr_recovers_the_per_sample_ratio(rho):
    g = torch.Generator().manual_seed(0)
    dim, n = 20_000, 64
    mu = torch.randn(dim, generator=g)
    mu *= (rho * dim) ** 0.5 / mu.norm()  # |mu|^2 = rho * T with per-sample noise of total variance T = dim
    batches = [mu + torch.randn(dim, generator=g) / n**0.5 for _ in range(6)]
    result = snr(batches, n)
    expected_cos = rho * n / (rho * n + 1)
    assert result["mean_cos"] == pytest.approx(expected_cos, abs=0.03)
    assert result["per_sample_snr"] == pytest.approx(rho, rel=0.25)
    assert result["samples_for_snr_1"] == pytest.approx(1 / rho, rel=0.25)


def test_pure_noise_reports_no_signal():
    g = torch.Generator().manual_seed(1)
    result = snr([torch.randn(50_000, generator=g) for _ in range(4)], 32)
    assert abs(result["mean_cos"]) < 0.02
    assert result["per_sample_snr"] < 1e-3


def test_epoch_gradients_are_reproducible_and_leave_weights_alone(tmp_path):
    from finetune.config import load_config
    from finetune.trainer import Trainer
    from tests.helpers import tiny_sd3

    tiny_sd3().save_pretrained(tmp_path / "model")
    cfg = load_config("configs/demo/nft_shapes_flow.yaml", [
        f"model.path={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}", "cpu=true", "reward=brightness",
        "model.num_steps=3", "sample.groups_per_epoch=2", "sample.group_size=4", "sample.batch_size=8",
        "train.batch_size=4", "eval.every=0", "log.tensorboard=false"])
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    a, reward_a = epoch_gradient(trainer, 3)
    b, reward_b = epoch_gradient(trainer, 3)
    c, _ = epoch_gradient(trainer, 4)
    assert reward_a == reward_b and torch.equal(a, b)  # same epoch, same draws, same gradient
    assert a.norm() > 0 and not torch.equal(a, c)
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, before))
    assert all(p.grad is None for p in trainer.params)
    with pytest.raises(ValueError, match="--per-step needs an objective trained on every recorded sampler step"):
        epoch_step_gradients(trainer, 3)  # NFT trains on the forward process


def test_standard_error_covers_pure_noise_of_low_effective_dimension():
    # Gradient noise that lives in a few directions makes cosines swing widely; the reported standard
    # error must say so (two standard errors cover zero in most draws), where the spread of the
    # shared-gradient pairs alone would claim a signal far more often.
    basis = torch.randn(5, 5_000, generator=torch.Generator().manual_seed(99))
    covered = 0
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        result = snr([torch.randn(5, generator=g) @ basis for _ in range(4)], 32)
        assert result["cos_sem"] > 0
        covered += abs(result["mean_cos"]) < 2 * result["cos_sem"]
    assert covered >= 88


@pytest.mark.parametrize("window", [None, [1, 3]], ids=["all-steps", "sde-window"])
def test_step_gradients_add_up_to_the_epoch_gradient(tmp_path, window):
    from finetune.config import load_config
    from finetune.trainer import Trainer
    from tests.helpers import tiny_sd

    tiny_sd().save_pretrained(tmp_path / "model")
    windowed = [] if window is None else ["sample.sde_window_size=2", f"sample.sde_window_range={window}"]
    cfg = load_config("configs/ddpo_shapes_sd.yaml", [
        f"model.path={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}", "cpu=true", "reward=brightness",
        "model.num_steps=3", "sample.groups_per_epoch=2", "sample.group_size=4", "sample.batch_size=8",
        "train.batch_size=4", "train.timestep_fraction=1.0", "eval.every=0", "log.tensorboard=false", *windowed])
    trainer = Trainer(cfg)
    rows, _ = epoch_step_gradients(trainer, 5)
    whole, _ = epoch_gradient(trainer, 5)
    # Steps outside the SDE window are deterministic: nothing to train there, a zero row.
    trained = torch.tensor([window is None or window[0] <= k < window[1] for k in range(3)])
    assert rows.shape == (3, whole.numel()) and torch.equal(rows.norm(dim=1) > 0, trained)
    # Same rollouts, same samples and steps, summed in another order: the same direction.
    assert torch.nn.functional.cosine_similarity(rows.sum(0), whole, dim=0) > 0.9999
    assert all(p.grad is None for p in trainer.params)
