"""DeepSpeed misconfigurations get a clear error (no DeepSpeed run needed)."""

import importlib.util
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from finetune import checkpoint, distributed


def test_a_deepspeed_launch_without_deepspeed_installed_says_how_to_install(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[deepspeed\]"'):
        distributed.build_accelerator(OmegaConf.create({"cpu": True}))


@pytest.mark.parametrize("sharded", [True, False])
def test_resuming_across_deepspeed_and_ddp_is_refused_by_name(tmp_path, monkeypatch, sharded):
    folder = tmp_path / "checkpoint-1"
    (folder / checkpoint.SHARDED if sharded else folder).mkdir(parents=True)
    monkeypatch.setattr(distributed, "is_deepspeed", lambda acc: not sharded)
    written = "under DeepSpeed" if sharded else "without DeepSpeed"
    with pytest.raises(ValueError, match=f"it was written {written}; resume it the same way"):
        distributed.load_optimizer(SimpleNamespace(), folder, optimizer=None)
