"""What the trainer needs from accelerate beyond plain DDP: DeepSpeed ZeRO-2 (``accelerate launch
--config_file launch/accelerate/zero2.yaml``; ``pip install -e ".[deepspeed]"``).

Under ZeRO-2 the prepared module stays whole on every process (only the gradients and the optimizer
state are sharded), so reference copies, old-policy snapshots, EMA and exports read and write its
parameters as usual. What differs, and lives here:

* the Accelerator must be built without ``cpu=True`` (which silently drops DeepSpeed);
* DeepSpeed wants its batch sizes, accumulation count and clipping before ``prepare``, and its own
  accumulation count kept equal to the trainer's, which changes at run time;
* DeepSpeed casts the module to bf16/fp16 where accelerate's autocast does nothing;
* the optimizer state is sharded: each process saves and loads its shard (``save_state``).

ZeRO-3 also shards the weights (empty outside DeepSpeed's forward), which the copies above would read
as empty tensors: it is refused.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from finetune import checkpoint


def launched_with_deepspeed() -> bool:
    """``accelerate launch`` with a DeepSpeed config says so in the environment of each process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_deepspeed(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED


def build_accelerator(cfg, **kwargs) -> Accelerator:
    if not launched_with_deepspeed():
        return Accelerator(cpu=cfg.cpu, **kwargs)
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError('launched with a DeepSpeed accelerate config, but deepspeed is not installed: '
                          'pip install -e ".[deepspeed]"')
    if cfg.cpu and torch.cuda.is_available():  # cpu=True would quietly run DDP instead of DeepSpeed
        raise ValueError("cpu=true cannot be combined with DeepSpeed on a machine with GPUs; to train on the CPU "
                         "under DeepSpeed hide the GPUs (CUDA_VISIBLE_DEVICES=)")
    handlers = []
    if not torch.cuda.is_available():
        import deepspeed.ops

        # On CPU DeepSpeed would JIT-build a shared-memory collective op (minutes) on first use; gloo does the job.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # accelerate names no backend without a GPU, and every process would then count itself alone.
        handlers = [InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(kwargs_handlers=handlers, **kwargs)
    stage = acc.state.deepspeed_plugin.zero_stage
    if stage not in (0, 1, 2):
        raise ValueError(f"the accelerate config sets DeepSpeed zero_stage: {stage}, which the trainer does not "
                         "support: ZeRO-3 shards the weights themselves (the frozen text encoders too), while the "
                         "reference copy, old-policy snapshots, EMA and checkpoints read them whole. Use ZeRO-2 "
                         "(launch/accelerate/zero2.yaml)")
    return acc


def prepare(acc: Accelerator, module: torch.nn.Module, optimizer, train):
    """``acc.prepare(module, optimizer)``; under DeepSpeed with the batch and clipping settings (of the config's
    ``train`` section) it needs first: no dataloader is prepared, so nothing fills its "auto" entries."""
    if is_deepspeed(acc):
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = train.batch_size
        ds["gradient_accumulation_steps"] = 1  # set_accumulation gives the real count each epoch
        ds["train_batch_size"] = train.batch_size * acc.num_processes
        ds["gradient_clipping"] = train.max_grad_norm or 0.0  # left unset DeepSpeed would clip at 1.0
    return acc.prepare(module, optimizer)


def set_accumulation(acc: Accelerator, steps: int) -> None:
    """Micro-steps per optimizer step. DeepSpeed divides each loss by its own count, not accelerate's."""
    acc.gradient_accumulation_steps = steps
    if is_deepspeed(acc):
        engine = acc.deepspeed_engine_wrapped.engine
        engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * steps * engine.dp_world_size)
        if hasattr(engine.optimizer, "gradient_accumulation_steps"):  # ZeRO's own copy (used with CPU offload)
            engine.optimizer.gradient_accumulation_steps = steps


def fresh_accumulation(acc: Accelerator, optimizer) -> None:
    """Drop gradients accumulated since the last optimizer step and restart accelerate's micro-step count."""
    if is_deepspeed(acc) and acc.step % acc.gradient_accumulation_steps:
        # ZeRO-2 keeps them reduced in its own buffers, which only its step clears (preflight's batch-size
        # check should make this unreachable).
        raise RuntimeError("under DeepSpeed every epoch must end on an optimizer step; this one ended "
                           f"{acc.step % acc.gradient_accumulation_steps} micro-steps into an accumulation")
    optimizer.zero_grad()
    acc.step = 0


def autocast(acc: Accelerator):
    """Mixed precision for forward passes. DeepSpeed casts the module itself to bf16/fp16 and accelerate's
    autocast does nothing then, so fp32 inputs (latents) would not match the weights without this."""
    if is_deepspeed(acc) and acc.mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16
        return torch.autocast(acc.device.type, dtype=dtype)
    return acc.autocast()


def save_checkpoint(acc: Accelerator, root: Path, epoch: int, tensors: dict, optimizer, state: dict, keep: int):
    """``checkpoint.save`` from the main process; under DeepSpeed every process first writes its optimizer
    shard into a staging folder that the main process then moves into the checkpoint before renaming it."""
    staging = None
    if is_deepspeed(acc):
        checkpoint.refuse_nonfinite(tensors, epoch, root)  # on every process, before the collective save
        staging = Path(root) / f".staging-checkpoint-{epoch}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
        acc.wait_for_everyone()
        # Frozen weights (a LoRA's base model) come from model.path again; only what is trained is saved.
        # Several machines must share root's filesystem: each process writes its own shard here.
        acc.save_state(str(staging), exclude_frozen_parameters=True)
        acc.wait_for_everyone()
    if acc.is_main_process:
        checkpoint.save(root, epoch, tensors, optimizer, state, keep=keep, scaler=acc.scaler, sharded=staging)
    acc.wait_for_everyone()


def load_optimizer(acc: Accelerator, folder: Path, optimizer) -> None:
    """The optimizer state of ``folder`` (under DeepSpeed also its master weights); every process calls this."""
    sharded = (folder / checkpoint.SHARDED).is_dir()
    if sharded != is_deepspeed(acc):
        written = "under DeepSpeed" if sharded else "without DeepSpeed"
        raise ValueError(f"cannot resume from {folder}: it was written {written}; resume it the same way "
                         "(the same accelerate config), or train into a new output_dir")
    if sharded:
        acc.load_state(str(folder / checkpoint.SHARDED), load_module_strict=False)  # frozen weights were left out
    else:
        checkpoint.load_optimizer(folder, optimizer, acc.scaler)
