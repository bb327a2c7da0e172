"""DeepSpeed ZeRO-2 on two gloo CPU processes (launch/accelerate/cpu_zero2.yaml): LoRA and full fine-tuning,
exact resume from the sharded checkpoint, and ZeRO-3 refused by name. About two minutes on two cores."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune import checkpoint
from tests.helpers import tiny_sd

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
DDPO, NFT = "configs/ddpo_shapes_sd.yaml", "configs/nft_shapes_flow.yaml"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "sd"
    tiny_sd().save_pretrained(path)
    return path


def launch(recipe, model, out, *overrides, config="cpu_zero2.yaml", **env):
    """tests/deepspeed_check.py in two fresh processes; returns their reports (or the failed run)."""
    script = [str(ROOT / "tests" / "deepspeed_check.py"), recipe, str(model), str(out), *overrides]
    config = str(ROOT / "launch" / "accelerate" / config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *script]
    # CPU only, even where GPUs exist: the two processes must not share (or fight over) one GPU.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return done
    reports = [json.loads((Path(out) / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert all(r["world"] == 2 and r["distributed_type"] == "DistributedType.DEEPSPEED" for r in reports)
    assert reports[0]["after"] == reports[1]["after"]  # the same weights on both processes
    return reports


def test_lora_resume_from_a_sharded_checkpoint_is_exact(model, tmp_path):
    straight = launch(DDPO, model, tmp_path / "straight", "train.epochs=2", "checkpoint.keep=0")
    assert isinstance(straight, list), straight.stderr[-3000:]
    first = straight[0]
    assert first["finite"] and first["after"] != first["before"] and first["global_step"] == 4
    saved = tmp_path / "straight" / "checkpoints"
    assert checkpoint.latest(saved) == saved / "checkpoint-2"
    assert (saved / "checkpoint-1" / checkpoint.SHARDED).is_dir() and not list(saved.glob(".*checkpoint-*"))
    # Epoch 1's checkpoint, resumed in fresh processes, must continue exactly as the straight run did.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(saved / "checkpoint-1", resumed_dir / "checkpoint-1")
    (resumed_dir / "latest").write_text("checkpoint-1")
    resumed = launch(DDPO, model, tmp_path / "resumed", "train.epochs=2", "checkpoint.keep=0")
    assert isinstance(resumed, list), resumed.stderr[-3000:]
    assert first["start_epoch"] == 0 and resumed[0]["start_epoch"] == 1
    assert resumed[0]["after"] == first["after"] and resumed[0]["global_step"] == 4


def test_full_fine_tuning_in_bf16_with_reference_old_policy_ema_and_a_nan_step(model, tmp_path):
    """DiffusionNFT keeps an old-policy copy and (kl_beta > 0) a frozen reference; bf16 makes DeepSpeed cast
    the module while the copies and the EMA stay fp32. A NaN loss on one process skips that step everywhere."""
    out = tmp_path / "nft"
    reports = launch(NFT, model, out, "train.epochs=2", "lora.enabled=false", "train.mixed_precision=bf16",
                     "train.ema_decay=0.5", "objective.kl_beta=0.1", NAN_LOSS_CALL="3")  # in the 2nd of 4 steps
    assert isinstance(reports, list), reports.stderr[-3000:]
    r = reports[0]
    assert r["finite"] and r["after"] != r["before"] and r["dtype"] == "torch.bfloat16"
    assert all(x["global_step"] == 3 and x["skipped_steps"] == 1 for x in reports)
    saved = load_file(checkpoint.latest(out / "checkpoints") / "trainable.safetensors")
    assert any(k.startswith("ema/") for k in saved) and any(k.startswith("objective/old/") for k in saved)
    history = json.loads((out / "history.json").read_text())
    assert all(h["kl"] > 0 for h in history)  # the reference is there and differs from the policy
    assert (out / "model" / "model_index.json").is_file()


def test_zero3_is_refused_before_the_model_loads(model, tmp_path):
    done = launch(DDPO, model, tmp_path, "train.epochs=1", config="cpu_zero3.yaml")
    assert not isinstance(done, list)
    assert "zero_stage: 3" in done.stderr and "launch/accelerate/zero2.yaml" in done.stderr
