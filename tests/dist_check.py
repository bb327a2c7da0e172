"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo, CPU).

Each process writes what it saw: its prompts, the advantage tracker's state after gathering, and a
checksum of its trainable parameters after one optimisation epoch.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from finetune.config import load_config
from finetune.trainer import Trainer

model, out = sys.argv[1], sys.argv[2]
TINY = [f"model.path={model}", "cpu=true", "reward=brightness", "model.num_steps=3", "sample.groups_per_epoch=2",
        "sample.group_size=4", "sample.batch_size=8", "train.batch_size=4", "log.tensorboard=false"]
cfg = load_config("configs/ddpo_shapes_sd.yaml", [
    *TINY, f"output_dir={out}", "eval.every=0", "advantage.per_epoch=false", "train.lr=1e-2"])
trainer = Trainer(cfg)
acc = trainer.accelerator
before = {n: p.detach().clone() for n, p in trainer.trainable_state().items()}
rollout, advantages, stats = trainer.collect(0)
trainer.optimize(0, rollout, advantages)
after = trainer.trainable_state()
digest = hashlib.sha256(b"".join(after[n].detach().numpy().tobytes() for n in sorted(after))).hexdigest()
report = {
    "rank": acc.process_index, "world": acc.num_processes, "prompts": sorted(set(rollout.prompts)),
    "tracker": trainer.tracker.state_dict(), "params": digest,
    "moved": any(not torch.equal(before[n], after[n]) for n in after),
}
with open(f"{out}/rank{acc.process_index}.json", "w") as f:
    json.dump(report, f)

# Diffusion-DRO from demonstrations (the test wrote them): each process draws its own, both encode the
# set and write the shared latent cache, and the gradients are averaged.
cfg = load_config("configs/dro_shapes_sd.yaml", [
    *TINY, f"output_dir={out}/dro", f"data.expert={out}/expert", "eval.every=0", "lora.enabled=true",
    "sample.group_size=1", "sample.groups_per_epoch=4", "train.gradient_accumulation_steps=1", "train.lr=1e-2"])
trainer = Trainer(cfg)
rollout, advantages, _ = trainer.collect(0)
trainer.optimize(0, rollout, advantages)
after = trainer.trainable_state()
report["dro"] = {"prompts": rollout.prompts,
                 "params": hashlib.sha256(b"".join(after[n].detach().numpy().tobytes() for n in sorted(after))).hexdigest()}

# FIND trains its own module (the noise policy, DDP-wrapped) with the denoiser frozen: each process
# its own samples, one set of noise-policy parameters after the step, the calibration set identically.
cfg = load_config("configs/find_shapes_sd.yaml", [
    *TINY, f"output_dir={out}/find", "eval.every=0", "sample.group_size=4", "sample.batch_size=8",
    "train.batch_size=8", "train.lr=1e-2"])
trainer = Trainer(cfg)
rollout, advantages, _ = trainer.collect(0)
trainer.optimize(0, rollout, advantages)
after = trainer.trainable_state()
report["find"] = {"prompts": rollout.prompts, "moved": float(after["net.4.weight"].abs().sum()) > 0,
                  "params": hashlib.sha256(b"".join(after[n].detach().numpy().tobytes() for n in sorted(after))).hexdigest()}

# In-loop evaluation sharded over both processes: every process returns the same scores, and the
# results equal those of one process evaluating every prompt alone (rank 0 does that afterwards).
from finetune.evaluation import evaluate_geneval  # noqa: E402

cfg = load_config("configs/ddpo_shapes_sd.yaml", [*TINY, f"output_dir={out}/eval", "eval.every=1",
                                                  "eval.images_per_prompt=2", "sample.batch_size=4"])
trainer = Trainer(cfg)
prompts = trainer.eval_prompts[:5]
args = (trainer.policy, acc, prompts, cfg.eval, 4)
report["eval"] = {"sharded": evaluate_geneval(*args, Path(out) / "eval" / "sharded")}
if acc.is_main_process:
    report["eval"]["alone"] = evaluate_geneval(*args, Path(out) / "eval" / "alone", shard=(0, 1))
acc.wait_for_everyone()

# The training budget excludes evaluation on every process: the main process evaluates (here a 4 s
# stand-in) while the others wait, and that wait must not count against the shared budget.
cfg = load_config("configs/ddpo_shapes_sd.yaml", [
    *TINY, f"output_dir={out}/budget", "eval.every=1000", "train.epochs=1000", "train.max_minutes=0.05",
    "checkpoint.every=1000"])
trainer = Trainer(cfg)
trainer.evaluate = lambda epoch: (time.sleep(4), {"geneval_overall": 0.0})[1] if acc.is_main_process else {}
history = trainer.train()
report["budget"] = {"elapsed": history[-1]["time"], "epochs": history[-1]["epoch"]}
with open(f"{out}/rank{acc.process_index}.json", "w") as f:
    json.dump(report, f)
