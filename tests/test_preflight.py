"""Bad input is refused before any model loads, with the field and the fix in the message."""

import pytest

from finetune import checkpoint
from finetune.config import load_config
from finetune.preflight import preflight

RECIPE = "configs/ddpo_shapes_sd.yaml"


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Loading a model during a preflight would be the bug these tests look for."""
    import finetune.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(finetune.trainer, "load_policy", refuse)


def check(tmp_path, *overrides):
    from finetune.trainer import Trainer

    Trainer(load_config(RECIPE, [f"output_dir={tmp_path}", "cpu=true", "log.tensorboard=false", *overrides]))


@pytest.mark.parametrize("overrides, message", [
    (["objective.clip_rnge=0.1"], r"unknown option `objective.clip_rnge` for objective 'ddpo'; did you mean `clip_range`\?"),
    (["reward.partial_credt=true"], r"unknown option `reward.partial_credt` for reward 'geneval'; did you mean `partial_credit`\?"),
    (["reward=pickscore2"], r"unknown reward 'pickscore2'"),
    (["objective.name=dpok"], r"unknown objective 'dpok'"),
    (["objective.name=flow_grpo"], r"needs a flow model, but `model.path` is a sd model"),
    (["model.sde_type=cps"], r"model.sde_type='cps' applies to flow models"),
    (["model.path=/no/such/dir"], r"model path '/no/such/dir' does not exist"),
    (["model.path=runs/typo/model"], r"model path 'runs/typo/model' does not exist"),
    (["prompts.train=/no/such.jsonl"], r"config field `prompts.train`: no such file"),
    (["train.mixed_precision=fp8"], r"train.mixed_precision must be null"),
    (["model.dtype=float16"], r"model.dtype must be null"),
    (["train.batch_size=24"], r"32 samples per process per epoch must be a multiple of .* = 24"),
    (["train.max_nonfinite_steps=0"], r"train.max_nonfinite_steps must be >= 1"),
    (["checkpoint.keep=-1"], r"checkpoint.keep must be >= 0"),
    (["model.resolution=100"], r"model.resolution must be null .* multiple of 16"),
    (["model.embedding_cache=-1"], r"model.embedding_cache must be a number of prompts >= 0"),
    (["sample.group_size=0"], r"sample.group_size must be >= 1"),
    (["objective.name=loop", "sample.group_size=1", "sample.groups_per_epoch=8"],
     r"objective loop needs sample.group_size >= 2"),
    (["model.path=shapes-flow", "objective.name=g2rpo", "sample.group_size=1"],
     r"objective g2rpo needs sample.group_size >= 2"),
    (["model.path=shapes-flow", "objective.name=g2rpo", "train.gradient_accumulation_steps=2"],
     r"objective g2rpo trains 5 branching steps per epoch, not a multiple of train.gradient_accumulation_steps=2"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check(tmp_path, *overrides)


def test_a_hub_id_missing_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local folder and not in the Hugging Face cache"):
        check(tmp_path, "model.path=nobody/no-such-model")


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        check(tmp_path / "run", f"model.path={tmp_path / 'weights'}")


def test_resume_false_never_overwrites_an_earlier_runs_checkpoints(tmp_path):
    import torch

    w = torch.nn.Parameter(torch.zeros(2))
    checkpoint.save(tmp_path / "checkpoints", 3, {"w": w}, torch.optim.AdamW([w]), {})
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .*checkpoint-3.* set resume=true"):
        check(tmp_path, "resume=false")


def test_a_good_config_passes(tmp_path):
    checked = preflight(load_config(RECIPE, [f"output_dir={tmp_path}"]))
    assert checked.family == "sd" and checked.train_prompts and type(checked.objective).__name__ == "DDPO"


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1e-3"], "diffrl: error: unknown config key `train.lrr`; did you mean `train.lr`?"),
    (["train.lr", "1e-3"], "diffrl: error: override `train.lr` has no `=`: write key=value without spaces, "
                           "e.g. train.lr=1e-3"),
    (["objective.clip_rnge=0.1"], "diffrl: error: unknown option `objective.clip_rnge` for objective 'ddpo'"),
])
def test_the_cli_prints_one_error_line_without_a_traceback(tmp_path, capsys, overrides, message):
    from finetune.cli import main

    assert main(["train", "--config", RECIPE, f"output_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err and len(err.strip().splitlines()) == 1
