"""Probe: what accelerate + DeepSpeed ZeRO really do, on two CPU (gloo) processes.

    OMP_NUM_THREADS=1 accelerate launch --config_file launch/accelerate/cpu_zero2.yaml \
        launch/probe_deepspeed.py --out /tmp/probe            # first run: trains, saves, checks
    OMP_NUM_THREADS=1 accelerate launch --config_file launch/accelerate/cpu_zero2.yaml \
        launch/probe_deepspeed.py --out /tmp/probe --resume   # fresh processes: load_state, compare

Options: --lora (LoRA adapters made by peft on the same net), --bf16, --accelerator naive|cpu|ds (how the
Accelerator is built; only "ds" gives DeepSpeed with the right process count on CPU), --ds-gas 1 with or
without --sync-gas (DeepSpeed's accumulation count vs the loop's), --no-shm (skip a C++ op DeepSpeed builds).

The model is a small Linear stack. Beside it: a frozen reference copy (not prepared; used in the loss as a
KL-like pull), an old-policy snapshot taken before each step, and an EMA of the fp32 master weights that is
updated by hand and checkpointed through accelerator.register_for_checkpointing. A plain-torch shadow of the
model, trained with hand-made all-reduced gradients, is the reference for the numbers DeepSpeed produces.

Each process prints one JSON line per check, prefixed with "PROBE".
"""

import argparse
import copy
import json
from pathlib import Path

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state

MICRO_BATCH = 4  # samples per process per micro-step
ACCUMULATE = 3  # micro-steps per optimizer step, set at run time as the trainer does
LR, MAX_NORM = 1e-2, 0.05  # MAX_NORM is small so that clipping is active


def report(acc, check, **facts):
    print("PROBE", json.dumps({"rank": acc.process_index if acc else dist.get_rank(), "check": check, **facts},
                              default=str), flush=True)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                        torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.body(x)


def batch(step, micro, rank, dtype):
    """Different data on each process, micro-step and step; the same on every run."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    return torch.randn(MICRO_BATCH, 8, generator=g).to(dtype), torch.randn(MICRO_BATCH, 1, generator=g).to(dtype)


def loss_fn(model, reference, x, y, poison=False):
    out = model(x)
    with torch.no_grad():
        ref = reference(x.to(next(reference.parameters()).dtype)).to(out.dtype)
    loss = ((out - y) ** 2).mean() + 0.1 * ((out - ref) ** 2).mean()
    return loss * float("nan") if poison else loss


def build_accelerator(kind):
    if kind == "naive":  # what the trainer does today, less cpu=True
        return Accelerator()
    if kind == "cpu":  # the trainer with cfg.cpu=true
        return Accelerator(cpu=True)
    # DeepSpeed on CPU: accelerate finds no GPU backend, so name gloo or it counts one process.
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(kwargs_handlers=handlers)


def full_master(net):
    """fp32 master weights, whole, on every process (ZeRO shards them in the optimizer). Names are the
    unwrapped module's: the engine's own named_parameters() prefix them with "module."."""
    module = getattr(net, "module", net)
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def module_weights(net, stage):
    """The module's own (possibly bf16) weights, whole: ZeRO-3 needs them gathered first."""
    trained = [p for p in net.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trained, enabled=stage == 3):
        return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


class EMA:
    """EMA of the fp32 master weights; an object with state_dict, so save_state/load_state carry it."""

    def __init__(self, params, decay=0.9):
        self.decay, self.shadow, self.steps = decay, {n: v.clone() for n, v in params.items()}, 0

    def update(self, params):
        self.steps += 1
        for n, v in params.items():
            self.shadow[n].mul_(self.decay).add_(v, alpha=1 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow, "steps": self.steps}

    def load_state_dict(self, state):
        self.decay, self.shadow, self.steps = state["decay"], state["shadow"], state["steps"]


def make_models(lora):
    torch.manual_seed(0)
    net = Net()
    reference = copy.deepcopy(net).requires_grad_(False)  # frozen, never prepared
    if lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=4, lora_alpha=4, target_modules=["body.0", "body.2", "body.4"],
                                             init_lora_weights="gaussian"))
    return net, reference


def shadow_step(shadow, shadow_opt, reference, step, world, accumulate):
    """The uninterrupted, undistributed reference: mean of every process's loss, clipped, AdamW."""
    shadow_opt.zero_grad()
    for micro in range(accumulate):
        x, y = (t.to(next(shadow.parameters()).device) for t in batch(step, micro, dist.get_rank(), torch.float32))
        (loss_fn(shadow, reference, x, y) / accumulate).backward()
    grads = [p.grad for p in shadow.parameters() if p.requires_grad]
    for g in grads:  # the all-reduce DDP would do
        dist.all_reduce(g)
        g.div_(world)
    mean_grads = {n: p.grad.clone() for n, p in shadow.named_parameters() if p.requires_grad}  # before clipping
    norm = torch.nn.utils.clip_grad_norm_([p for p in shadow.parameters() if p.requires_grad], MAX_NORM)
    shadow_opt.step()
    return float(norm), mean_grads


def set_accumulation(acc, steps):
    """The trainer picks the accumulation count at run time. DeepSpeed divides each loss by its own
    gradient_accumulation_steps (fixed at prepare), so tell the engine too, or gradients are summed."""
    acc.gradient_accumulation_steps = steps
    engine = acc.deepspeed_engine_wrapped.engine
    engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * steps * engine.dp_world_size)


def train_step(acc, net, optimizer, reference, step, dtype, read_grads=False, poison=False, sync_gas=False):
    """One optimizer step of ACCUMULATE micro-steps, the trainer's way (accumulate + backward + step)."""
    engine = acc.deepspeed_engine_wrapped.engine if acc.deepspeed_engine_wrapped else None
    acc.step = 0  # the trainer resets accelerate's micro-step counter at each epoch
    if sync_gas:
        set_accumulation(acc, ACCUMULATE)
    else:
        acc.gradient_accumulation_steps = ACCUMULATE
    grads, losses = None, []
    for micro in range(ACCUMULATE):
        x, y = (t.to(acc.device) for t in batch(step, micro, acc.process_index, dtype))
        with acc.accumulate(net):
            loss = loss_fn(net, reference, x, y, poison=poison and micro == 0 and acc.process_index == 1)
            losses.append(float(loss))
            if read_grads and acc.sync_gradients and engine is not None:
                # To look at gradients before DeepSpeed steps, drive the engine by hand on the last micro-step:
                # accelerator.backward would reduce, clip, step and zero them in one call.
                engine.set_gradient_accumulation_boundary(True)
                engine.backward(loss)
                grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()
                         if p.requires_grad}
                engine.step()
            else:
                acc.backward(loss)
            if acc.sync_gradients:
                norm = acc.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], MAX_NORM)
                optimizer.step()  # a no-op under DeepSpeed: the engine stepped inside backward
                optimizer.zero_grad()
    return {"norm": norm, "skipped": acc.optimizer_step_was_skipped, "losses": losses, "grads": grads}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="enable DeepSpeed's bf16 (module cast to bf16)")
    parser.add_argument("--accelerator", choices=["naive", "cpu", "ds"], default="ds")
    parser.add_argument("--ds-gas", type=int, default=ACCUMULATE,
                        help="gradient_accumulation_steps given to DeepSpeed (the loop always does ACCUMULATE)")
    parser.add_argument("--sync-gas", action="store_true",
                        help="set the engine's accumulation from the loop's at each step (engine.set_train_batch_size)")
    parser.add_argument("--no-shm", action="store_true",
                        help="skip DeepSpeed's shared-memory CPU collectives (a C++ op built on first use) for gloo")
    args = parser.parse_args()
    out = Path(args.out)
    if args.no_shm:  # must precede the Accelerator, whose DeepSpeed init builds or loads the op
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    acc = build_accelerator(args.accelerator)
    report(acc, "environment", torch_world=dist.get_world_size() if dist.is_initialized() else None,
           torch_rank=dist.get_rank() if dist.is_initialized() else None,
           backend=dist.get_backend() if dist.is_initialized() else None, num_processes=acc.num_processes,
           process_index=acc.process_index, distributed_type=str(acc.distributed_type), device=str(acc.device),
           mixed_precision=acc.mixed_precision, ds_version=deepspeed.__version__,
           ds_accelerator=deepspeed.get_accelerator()._name)
    if acc.distributed_type != DistributedType.DEEPSPEED:
        report(acc, "stop", reason="not running under DeepSpeed")
        return

    # DeepSpeed wants batch sizes; with no dataloader nothing fills the "auto" entries, so set them here.
    plugin = acc.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = MICRO_BATCH
    ds["gradient_accumulation_steps"] = args.ds_gas
    ds["train_batch_size"] = MICRO_BATCH * args.ds_gas * acc.num_processes
    ds["gradient_clipping"] = MAX_NORM
    if args.bf16:
        ds["bf16"] = {"enabled": True}
    stage = plugin.zero_stage
    if stage == 3:  # else ZeRO-3 keeps parameters under 1e5 elements whole, and this tiny net is never sharded
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    net, reference = make_models(args.lora)
    reference.to(acc.device)  # frozen parts are placed by hand: prepare() never sees them
    shadow = copy.deepcopy(net).to(acc.device)  # plain torch, fp32, trained by hand for comparison
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    shadow_opt = torch.optim.AdamW([p for p in shadow.parameters() if p.requires_grad], lr=LR, weight_decay=1e-2)
    ema = EMA({n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad})

    engine, optimizer = acc.prepare(net, optimizer)  # no dataloader, no scheduler
    acc.register_for_checkpointing(ema)
    report(acc, "prepare", engine=type(engine).__module__ + "." + type(engine).__name__,
           optimizer=type(optimizer).__name__, inner_optimizer=type(optimizer.optimizer).__name__,
           unwrap_is_original=acc.unwrap_model(engine) is net, engine_module_is_original=engine.module is net,
           wrapped=type(acc.deepspeed_engine_wrapped).__name__, zero_stage=engine.zero_optimization_stage(),
           engine_gas=engine.gradient_accumulation_steps(), acc_gas=acc.gradient_accumulation_steps,
           train_batch_size=engine.train_batch_size(), clipping=engine.gradient_clipping(),
           module_dtype=str(next(net.parameters()).dtype), reference_dtype=str(next(reference.parameters()).dtype),
           reference_device=str(next(reference.parameters()).device),
           local_param_numels=[p.numel() for p in net.parameters() if p.requires_grad][:3],
           n_trainable=sum(p.numel() for p in params), ds_config=ds)

    ckpt = out / "state"
    expected_file = out / f"expected_rank{acc.process_index}.pt"
    if args.resume:
        acc.load_state(str(ckpt))
        report(acc, "load_state", ema_steps=ema.steps)
        result = train_step(acc, engine, optimizer, reference, 2, dtype)
        ema.update(full_master(engine))
        expected = torch.load(expected_file)
        got = full_master(engine)
        report(acc, "resume_exact", bit_identical=all(torch.equal(got[n], expected["params"][n]) for n in got),
               module_bit_identical=all(torch.equal(v, expected["module"][n])
                                        for n, v in module_weights(net, stage).items()),
               ema_bit_identical=all(torch.equal(ema.shadow[n], expected["ema"][n]) for n in got),
               max_abs_diff=max(float((got[n] - expected["params"][n]).abs().max()) for n in got),
               norm=result["norm"], expected_norm=expected["norm"])
        return

    world = dist.get_world_size()
    for step in range(3):
        before = full_master(engine)
        # A snapshot, as PPO-style objectives keep one. Under ZeRO-3 a parameter's data is an empty shard
        # outside forward: read it inside GatheredParameters (a no-op for ZeRO-2).
        raw_numel = sum(p.numel() for p in net.parameters() if p.requires_grad)
        old_policy = module_weights(net, stage)
        shadow_norm, shadow_grads = shadow_step(shadow, shadow_opt, reference, step, world, ACCUMULATE)
        result = train_step(acc, engine, optimizer, reference, step, dtype, read_grads=step == 0,
                            sync_gas=args.sync_gas)
        after = full_master(engine)
        ema.update(after)
        shadow_params = {n: p.detach() for n, p in shadow.named_parameters() if p.requires_grad}
        facts = dict(step=step, raw_numel_outside_forward=raw_numel, norm=result["norm"],
                     norm_type=type(result["norm"]).__name__, shadow_norm_preclip=shadow_norm,
                     skipped=result["skipped"],
                     moved=any(not torch.equal(before[n], after[n]) for n in after),
                     old_policy_matches_before=all(torch.equal(old_policy[n].float(), before[n]) for n in before)
                     if not args.bf16 else None,
                     module_equals_master=all(torch.equal(v.float(), after[n])
                                              for n, v in module_weights(net, stage).items()),
                     max_diff_vs_shadow=max(float((after[n] - shadow_params[n].float()).abs().max()) for n in after))
        if result["grads"] is not None:  # gradients read between engine.backward and engine.step
            facts["grad_max_diff_vs_mean_allreduced"] = max(
                float((result["grads"][n].float() - shadow_grads[n]).abs().max()) for n in shadow_grads)
            facts["grad_norm_ratio_vs_mean_allreduced"] = float(
                torch.stack([g.float().norm() for g in result["grads"].values()]).norm()
                / torch.stack([g.norm() for g in shadow_grads.values()]).norm())
            facts["grads_finite"] = all(bool(torch.isfinite(g).all()) for g in result["grads"].values())
        # Adam's first moment after step 0 is (1 - beta1) * the clipped gradient: shows what clipping did
        if step == 0:
            scale = min(1.0, MAX_NORM / (shadow_norm + 1e-6))
            facts["exp_avg_max_diff_vs_clipped_mean_grad"] = max(
                float((safe_get_full_optimizer_state(p, "exp_avg") / 0.1 - shadow_grads[n] * scale).abs().max())
                for n, p in net.named_parameters() if p.requires_grad)
        report(acc, "step", **facts)
        if step == 1:
            acc.save_state(str(ckpt))  # collective: every process calls it
            if acc.is_main_process:
                report(acc, "save_state", files=sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                                                       if p.is_file()))
        if step == 2:
            torch.save({"params": after, "ema": {n: v.clone() for n, v in ema.shadow.items()},
                        "norm": result["norm"],
                        "module": module_weights(net, stage)},
                       expected_file)

    # In-process resume: roll back to the state after step 1, redo step 2, must equal the first step 2.
    first = torch.load(expected_file)
    acc.load_state(str(ckpt))
    train_step(acc, engine, optimizer, reference, 2, dtype)
    got = full_master(engine)
    report(acc, "resume_in_process", bit_identical=all(torch.equal(got[n], first["params"][n]) for n in got))

    # A NaN loss on one process at one micro-step: does DeepSpeed skip the step on both, and say so?
    before = full_master(engine)
    result = train_step(acc, engine, optimizer, reference, 3, dtype, poison=True)
    after = full_master(engine)
    report(acc, "nan_step", norm=result["norm"], skipped=result["skipped"],
           params_unchanged=all(torch.equal(before[n], after[n]) for n in after),
           params_finite=all(bool(torch.isfinite(v).all()) for v in after.values()),
           engine_skipped_steps=engine.skipped_steps, global_steps=engine.global_steps)
    # Default loss scaling: DeepSpeed divides by its own gradient_accumulation_steps, not accelerate's.
    report(acc, "gas", engine_gas=engine.gradient_accumulation_steps(), acc_gas=acc.gradient_accumulation_steps)


if __name__ == "__main__":
    main()
