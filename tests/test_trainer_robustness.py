"""The trainer under failure: NaN steps, changed settings on resume, leftover gradients, mixed precision."""

import pytest
import torch

from finetune import checkpoint
from finetune.config import load_config
from finetune.trainer import Trainer
from tests.helpers import FAST, save_tiny_models



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def trainer(models, out, *overrides, recipe="configs/ddpo_shapes_sd.yaml", family="sd"):
    return Trainer(load_config(recipe, FAST + [f"model.path={models / family}", f"output_dir={out}", *overrides]))


def nan_after(trainer, good_calls):
    """Make the objective's loss NaN after ``good_calls`` calls."""
    loss, calls = trainer.objective.loss, [0]

    def patched(policy, batch):
        calls[0] += 1
        value, info = loss(policy, batch)
        return (value * float("nan") if calls[0] > good_calls else value), info

    trainer.objective.loss = patched


def test_nan_steps_are_skipped_then_the_run_stops_keeping_the_last_good_checkpoint(models, tmp_path):
    t = trainer(models, tmp_path, "train.epochs=4", "train.max_nonfinite_steps=3")
    nan_after(t, good_calls=6 + 1)  # epoch 1: 2 steps of 3 timesteps each; then one good call, then NaN
    # Epoch 2 skips both its steps (and still checkpoints its finite weights); epoch 3's first skip is the third.
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row had a non-finite loss.*checkpoint-2"):
        t.train()
    assert t.skipped_steps == 3 and t.global_step == 2
    assert all(torch.isfinite(p).all() for p in t.params)  # skipped steps never touch the weights
    assert [e for e, _ in checkpoint.checkpoints(tmp_path / "checkpoints")] == [1, 2]
    assert torch.isfinite(checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))[0][next(iter(t.trainable_state()))]).all()


def test_a_single_nan_step_is_skipped_and_counted(models, tmp_path):
    t = trainer(models, tmp_path, "train.epochs=2")
    loss, calls = t.objective.loss, [0]

    def one_bad(policy, batch):
        calls[0] += 1
        value, info = loss(policy, batch)
        return (value * float("inf") if calls[0] == 2 else value), info

    t.objective.loss = one_bad
    history = t.train()
    assert t.skipped_steps == 1 and t.global_step == 3 and history[-1]["skipped_steps"] == 1.0
    assert all(torch.isfinite(p).all() for p in t.params)


def test_resume_with_a_changed_lora_or_objective_is_refused_by_name(models, tmp_path):
    trainer(models, tmp_path, "train.epochs=1").train()
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-1: lora.rank: 8 in the checkpoint, 4 now"):
        trainer(models, tmp_path, "train.epochs=2", "lora.rank=4").train()
    with pytest.raises(ValueError, match=r"lora.target_modules: \[\] in the checkpoint, \['to_q'\] now"):
        trainer(models, tmp_path, "train.epochs=2", "lora.target_modules=[to_q]").train()
    with pytest.raises(ValueError, match=r"lora.enabled: True in the checkpoint, False now"):
        trainer(models, tmp_path, "train.epochs=2", "lora.enabled=false").train()
    resumed = trainer(models, tmp_path, "train.epochs=2")  # unchanged: resumes
    resumed.train()
    assert resumed.start_epoch == 1


def test_leftover_gradients_do_not_leak_into_the_next_epoch(models, tmp_path):
    runs = []
    for name, dirty in (("clean", False), ("dirty", True)):
        t = trainer(models, tmp_path / name, "train.gradient_accumulation_steps=2")
        rollout, advantages, _ = t.collect(0)
        if dirty:  # as if the last epoch (or the run before a resume) had stopped mid-accumulation
            for p in t.params:
                p.grad = torch.full_like(p, 1e3)
            t.accelerator.step = 3
        t.optimize(0, rollout, advantages)
        runs.append({n: p.detach().clone() for n, p in t.trainable_state().items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("family, recipe", [("sd", "configs/ddpo_shapes_sd.yaml"),
                                            ("flow", "configs/flow_grpo_shapes_flow.yaml")])
def test_mixed_precision_defers_to_accelerate_and_casts_the_frozen_parts(models, tmp_path, monkeypatch,
                                                                         fresh_accelerate_state, family, recipe):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` with a bf16 config sets
    t = trainer(models, tmp_path, "train.epochs=1", recipe=recipe, family=family)
    assert t.accelerator.mixed_precision == "bf16" and t.weight_dtype == torch.bfloat16
    pipe = t.policy.pipe
    assert pipe.vae.dtype == torch.bfloat16 and all(m.dtype == torch.bfloat16 for m in t.policy.text_encoders())
    frozen = [p for p in t.policy.denoiser.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the LoRA's base weights
    assert all(p.dtype == torch.float32 for p in t.params)  # what is trained stays fp32
    history = t.train()
    assert torch.isfinite(torch.tensor(history[-1]["reward_mean"])) and t.global_step == 2 and t.skipped_steps == 0


def test_an_explicit_setting_overrides_accelerate(models, tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    t = trainer(models, tmp_path, "train.mixed_precision=no", "lora.enabled=false", "objective.kl_beta=0.0")
    assert t.accelerator.mixed_precision == "no" and t.policy.pipe.vae.dtype == torch.float32
