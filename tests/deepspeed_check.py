"""Run by test_deepspeed.py under `accelerate launch --config_file launch/accelerate/cpu_zero2.yaml`.

    deepspeed_check.py RECIPE MODEL OUT [overrides...]

Trains RECIPE, made tiny (tests/helpers.py FAST), with the given overrides (resuming from
OUT/checkpoints if one is there) and writes OUT/rank<i>.json: the world size, a checksum of the
trainable weights before and after training, whether they are finite, the step counts and the epoch
training started from (after a resume). With NAN_LOSS_CALL=k the k-th loss on process 1 is NaN.
"""

import hashlib
import json
import os
import sys

import torch

from finetune.config import load_config
from finetune.trainer import Trainer
from tests.helpers import FAST


def digest(tensors):
    return hashlib.sha256(b"".join(tensors[n].detach().float().numpy().tobytes() for n in sorted(tensors))).hexdigest()


recipe, model, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
# cpu=false: under DeepSpeed the device is DeepSpeed's (the test hides any GPU).
cfg = load_config(recipe, [*FAST, "cpu=false", f"model.path={model}", f"output_dir={out}", "train.lr=1e-2", *overrides])
trainer = Trainer(cfg)
acc = trainer.accelerator
if os.environ.get("NAN_LOSS_CALL") and acc.process_index == 1:  # this loss call on one process only returns NaN
    loss, calls = trainer.objective.loss, [0]

    def poisoned(policy, batch):
        calls[0] += 1
        value, info = loss(policy, batch)
        return (value * float("nan") if calls[0] == int(os.environ["NAN_LOSS_CALL"]) else value), info

    trainer.objective.loss = poisoned
before = digest(trainer.trainable_state())
trainer.train()
after = trainer.trainable_state()
report = {"world": acc.num_processes, "distributed_type": str(acc.distributed_type), "before": before,
          "after": digest(after), "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
          "dtype": str(next(iter(after.values())).dtype), "global_step": trainer.global_step,
          "skipped_steps": trainer.skipped_steps, "start_epoch": trainer.start_epoch}
with open(f"{out}/rank{acc.process_index}.json", "w") as f:
    json.dump(report, f)
