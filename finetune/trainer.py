"""The RL fine-tuning loop: sample -> reward -> advantages -> inner epochs of objective.loss.

Reads top to bottom like a recipe. What is collected, how rewards become advantages and how the
rollout is cut into minibatches are the objective's hooks (finetune/objectives/base.py); the loop
around them is the same for all. Works unchanged under ``accelerate launch`` with several
processes: each process samples its own prompt groups, rewards and prompts are gathered so that
every process computes the same per-prompt advantages, and gradients are averaged by DDP, or by
DeepSpeed ZeRO-2 (what that needs lives in finetune/distributed.py).

Every random draw of epoch e on process r comes from a generator seeded with (seed, e, r), so a
run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from diffusers.training_utils import EMAModel, cast_training_params
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from finetune import checkpoint, distributed
from finetune.advantages import PerPromptStatTracker
from finetune.collect import PROMPTS, EpochContext
from finetune.evaluation import evaluate_geneval
from finetune.model_card import write_denoiser_card
from finetune.models import load_policy
from finetune.models.hub import save_pipeline
from finetune.objectives import build_objective
from finetune.preflight import mixed_precision, preflight
from finetune.report import flat_hparams, plot_curves
from finetune.rollout import Rollout
from finetune.timing import Phases


def weight_dtype(dtype: str | None, mixed_precision: str) -> torch.dtype:
    """``model.dtype``, or by default the dtype of accelerate's mixed precision (fp32 without it)."""
    name = dtype or {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        checked = preflight(cfg)  # keys, values, prompts, reward, objective, paths: before the model loads
        self.train_prompts, self.eval_prompts = checked.train_prompts, checked.eval_prompts
        self.reward, self.objective = checked.reward, checked.objective
        self.prompts_by_tag: dict[str, list[dict]] = {}
        for record in self.train_prompts:
            self.prompts_by_tag.setdefault(record.get("tag", "untagged"), []).append(record)
        self.evaluates = bool(cfg.eval.every or cfg.eval.get("every_minutes"))
        trackers = [name for name in ("tensorboard", "wandb") if cfg.log.get(name)]
        # mixed_precision null defers to `accelerate launch`'s config (its bf16 / fp16 setting).
        self.accelerator = distributed.build_accelerator(cfg, mixed_precision=mixed_precision(cfg),
                                                         log_with=trackers or None, project_dir=str(self.out))
        set_seed(cfg.seed)  # LoRA initialisation draws from the global generator
        m = cfg.model
        # Frozen parts (VAE, text encoders, a LoRA's base weights, reference copies) run in the training
        # dtype, as in diffusers' training scripts; what is trained stays fp32 (master weights).
        self.weight_dtype = weight_dtype(m.get("dtype"), self.accelerator.mixed_precision)
        self.policy = load_policy(m.path, m.guidance_scale, m.num_steps, m.noise, torch_dtype=self.weight_dtype,
                                  resolution=m.get("resolution"), text_encoder_3=m.get("text_encoder_3", True),
                                  max_sequence_length=m.get("max_sequence_length"))
        self.policy.embedding_cache_size = m.get("embedding_cache", 0)
        if cfg.train.get("gradient_checkpointing"):
            self.policy.denoiser.enable_gradient_checkpointing()
        if checked.family is None:  # a hub id that had to be downloaded: its family is known only now
            options = dict(cfg.objective)
            self.objective = build_objective(options.pop("name"), self.policy.family, **options)
        if m.get("sde_type"):
            if self.policy.family != "flow":
                raise ValueError(f"model.sde_type={m.sde_type!r} applies to flow models; {m.path} is not one")
            self.policy.sde_type = m.sde_type
        self.policy.pipe.to(self.accelerator.device)
        if not self.objective.trains_denoiser:
            self.policy.denoiser.requires_grad_(False)
        elif cfg.lora.enabled:
            self.policy.add_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
            cast_training_params(self.policy.denoiser, torch.float32)
        else:
            if self.policy.denoiser.dtype != torch.float32:
                self.policy.denoiser.to(torch.float32)
            self.policy.denoiser.requires_grad_(True)
        if self.objective.needs_reference:
            self.policy.freeze_reference(self.weight_dtype)
        self.module = self.objective.trained_module(self.policy).to(self.accelerator.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.objective.setup(self.policy, self.params)
        self.global_step = 0  # optimizer steps so far
        self.skipped_steps = self.nonfinite_in_a_row = 0  # optimizer steps skipped for NaN/inf loss or gradients
        optimizer = torch.optim.AdamW(self.objective.param_groups(self.module, cfg.train.lr), lr=cfg.train.lr,
                                      betas=(0.9, 0.999), weight_decay=cfg.train.weight_decay, eps=1e-8)
        # Optional EMA of the trained weights for eval and export; fp32: made before prepare may cast to bf16.
        self.ema = EMAModel(self.params, decay=cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.net, self.optimizer = distributed.prepare(self.accelerator, self.module, optimizer, cfg.train)
        if not self.objective.trains_denoiser:
            self.objective.net = self.net
        a = cfg.advantage
        self.tracker = PerPromptStatTracker(a.buffer_size, a.min_count, a.global_std)
        self.history: list[dict] = []
        self.start_epoch = 0
        # Seconds per phase of each epoch (history's time/* columns; `diffrl bench throughput` reads them).
        self.phases = Phases(synchronize=self.accelerator.device.type == "cuda")

    # -- checkpoints ------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def save(self, epoch: int) -> None:
        state = {"tracker": self.tracker.state_dict(), "history": self.history, "global_step": self.global_step,
                 "skipped_steps": self.skipped_steps, "trained": checkpoint.fingerprint(self.cfg)}
        tensors = self.trainable_state()
        if self.ema is not None:
            state["ema_step"] = self.ema.optimization_step
            tensors.update({f"ema/{name}": shadow for name, shadow in zip(list(tensors), self.ema.shadow_params)})
        tensors.update({f"objective/{k}": v for k, v in self.objective.state_dict().items()})
        distributed.save_checkpoint(self.accelerator, self.out / "checkpoints", epoch, tensors, self.optimizer, state,
                                    self.cfg.checkpoint.keep)

    def maybe_resume(self) -> None:
        folder = checkpoint.latest(self.out / "checkpoints") if self.cfg.resume else None
        if folder is None:
            return
        params, state = checkpoint.load(folder)
        checkpoint.check_resumable(folder, state, params, checkpoint.fingerprint(self.cfg), self.trainable_state())
        distributed.load_optimizer(self.accelerator, folder, self.optimizer)
        current = self.trainable_state()
        with torch.no_grad():
            for name, value in current.items():
                value.copy_(params[name])
        self.tracker.load_state_dict(state["tracker"])
        self.objective.load_state_dict({k[len("objective/"):]: v for k, v in params.items()
                                        if k.startswith("objective/")})
        self.global_step = state.get("global_step", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.ema is not None:
            self.ema.optimization_step = state["ema_step"]
            self.ema.shadow_params = [params[f"ema/{name}"].to(self.accelerator.device) for name in current]
        self.history = state["history"]
        self.start_epoch = state["epoch"]
        self.accelerator.print(f"resumed from {folder} at epoch {self.start_epoch}")

    # -- one epoch ----------------------------------------------------------------------------
    def context(self, epoch: int) -> EpochContext:
        return EpochContext(self.cfg, epoch, self.policy, self.reward, self.accelerator, self.tracker, self.phases)

    def collect(self, epoch: int) -> tuple[Rollout, torch.Tensor, dict]:
        """Sample this process's prompt groups, score them (the objective's ``collect``), and turn
        every process's rewards into advantages (its ``advantages``)."""
        s, acc, ctx = self.cfg.sample, self.accelerator, self.context(epoch)
        rng = random.Random(int(ctx.generator(PROMPTS).initial_seed()))
        groups = [self.pick_prompt(rng) for _ in range(s.groups_per_epoch)]
        self.policy.net = self.policy.denoiser  # sample with the bare module, outside DDP
        with self.phases("sample"):
            rollout = self.objective.collect(ctx, [r for r in groups for _ in range(s.group_size)])
        if not self.objective.uses_reward:  # demonstrations: nothing to score or normalise
            return rollout, torch.zeros(len(rollout), device=acc.device), {}
        # Every process sees every prompt's rewards, so per-prompt statistics agree everywhere.
        with self.phases("gather"):
            all_rewards = acc.gather(rollout.rewards.to(acc.device)).cpu()
            all_prompts = gather_object(rollout.prompts) if acc.num_processes > 1 else rollout.prompts
            advantages = self.objective.advantages(ctx, all_prompts, all_rewards).float()
        if self.cfg.advantage.per_epoch:
            self.tracker.clear()
        n = len(rollout)
        mine = advantages[acc.process_index * n:(acc.process_index + 1) * n]
        sample_rewards = all_rewards if all_rewards.ndim == 1 else all_rewards[:, 0]  # column 0: the samples'
        stats = {"reward_mean": float(sample_rewards.mean()), "reward_std": float(sample_rewards.std())}
        for key, value in rollout.reward_info.items():
            stats[f"reward/{key}"] = float(acc.gather(value.float().to(acc.device)).mean())
        return rollout, mine.to(acc.device), stats

    def pick_prompt(self, rng: random.Random) -> dict:
        """A train prompt, uniformly, or (``prompts.balance: tag``) a tag uniformly and then one of its prompts.

        GenEval's overall score is the mean of its task scores, but the prompt space is dominated
        by one task (color_attr is 93 % of the shapes train split), so sampling by tag trains on
        what the metric weighs.
        """
        if self.cfg.prompts.get("balance") == "tag":
            return rng.choice(self.prompts_by_tag[rng.choice(sorted(self.prompts_by_tag))])
        return rng.choice(self.train_prompts)

    def optimize(self, epoch: int, rollout: Rollout, advantages: torch.Tensor) -> dict:
        """The objective's minibatches (its ``batches``); gradients accumulate as they say."""
        acc = self.accelerator
        if self.objective.trains_denoiser:
            self.policy.net = self.net
        self.objective.start_epoch()
        # Each epoch starts a fresh accumulation: nothing left over from the last epoch (or from
        # before a resume) may leak into its first optimizer step.
        distributed.fresh_accumulation(acc, self.optimizer)
        logs: dict[str, list[float]] = {}
        for batch in self.objective.batches(self.context(epoch), rollout, advantages):
            with acc.accumulate(self.net), distributed.autocast(acc):
                loss, info = self.objective.loss(self.policy, batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    self.optimizer_step(loss)
            for key, value in info.items():
                logs.setdefault(key, []).append(float(value))
        self.objective.end_epoch(self.global_step)
        self.policy.net = self.policy.denoiser
        return {**{k: float(np.mean(v)) for k, v in logs.items()}, "skipped_steps": float(self.skipped_steps)}

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Clip and step, unless the loss or gradients are NaN/inf: then skip and count the step.

        The norm is all-reduced (by DDP; DeepSpeed's engine skips its own step on it, in ``acc.backward``),
        so every process skips the same steps. Under fp16 the grad scaler decides (its overflows are
        expected); either way ``train.max_nonfinite_steps`` skips in a row abort the run, last good checkpoint kept.
        """
        acc = self.accelerator
        norm = acc.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm or float("inf"))
        finite = bool(torch.isfinite(torch.as_tensor(norm)))
        if finite or acc.scaler is not None:
            self.optimizer.step()
        self.optimizer.zero_grad()
        if finite if acc.scaler is None else not acc.optimizer_step_was_skipped:
            self.nonfinite_in_a_row = 0
            self.global_step += 1
            self.objective.after_step(self.global_step)
            if self.ema is not None and self.global_step % self.cfg.train.ema_every == 0:
                self.ema.step(self.params)
            return
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            last = checkpoint.latest(self.out / "checkpoints")
            raise FloatingPointError(
                f"{limit} optimizer steps in a row had a non-finite loss or gradient (loss {float(loss.detach()):.4g}, "
                f"gradient norm {float(norm):.4g}); stopped. Lower train.lr, check the reward and the model's "
                f"dtype, or raise train.max_nonfinite_steps. Last good checkpoint: {last or 'none yet'}")

    # -- evaluation ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights in (if EMA is on) for evaluation and export."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def evaluate(self, epoch: int) -> dict:
        """GenEval-shapes on the held-out prompts, sharded over all processes (each returns the scores)."""
        self.policy.net = self.policy.denoiser
        with self.phases("evaluate"):
            return evaluate_geneval(self.policy, self.accelerator, self.eval_prompts, self.cfg.eval,
                                    self.cfg.sample.batch_size * 2, self.out / "eval" / f"epoch-{epoch:04d}",
                                    initial_latents=self.objective.initial_latents)

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        self.maybe_resume()
        if acc.log_with:
            acc.init_trackers("diffrl", config=flat_hparams(OmegaConf.to_container(cfg, resolve=True)))
        # time: sampling + training (what train.max_minutes bounds); wall: everything, evaluation and waits included.
        wall_start = time.perf_counter() - (self.history[-1].get("wall", 0.0) if self.history else 0.0)

        def stamp(record: dict) -> dict:  # the phases' seconds since the last stamp, and the wall clock so far
            record.update(self.phases.pop(), wall=time.perf_counter() - wall_start)
            return record

        if self.start_epoch == 0 and self.evaluates and not self.history and cfg.eval.get("at_start", True):
            self.history.append(stamp({"epoch": 0, "time": 0.0, **self.evaluate(0)}))
        elapsed = self.history[-1]["time"] if self.history else 0.0
        bar = self.progress_bar(elapsed)
        for epoch in range(self.start_epoch, cfg.train.epochs):
            # The main process writes evaluation files and checkpoints while the others go on; without
            # this barrier they would count their wait for it as training time.
            with self.phases("wait"):
                acc.wait_for_everyone()
            started = time.perf_counter()
            rollout, advantages, stats = self.collect(epoch)
            with self.phases("optimize"):
                stats.update(self.optimize(epoch, rollout, advantages))
            elapsed += time.perf_counter() - started
            record = {"epoch": epoch + 1, "time": elapsed, **stats}
            stop = self.budget_spent(elapsed)
            last = epoch + 1 == cfg.train.epochs or stop
            if self.evaluates and (self.eval_due(epoch + 1, elapsed) or last):
                with self.ema_weights():
                    record.update(self.evaluate(epoch + 1))
            self.history.append(stamp(record))
            if (epoch + 1) % cfg.checkpoint.every == 0 or last:
                with self.phases("checkpoint"):
                    self.save(epoch + 1)
                stamp(record)
            if acc.log_with:
                acc.log({k: v for k, v in record.items() if isinstance(v, float)}, step=epoch + 1)
            bar.update(min(elapsed / 60, bar.total) - bar.n if cfg.train.max_minutes else 1)
            if "reward_mean" in stats:
                bar.set_postfix(epoch=epoch + 1, reward=f"{stats['reward_mean']:.3f}")
            if stop:
                acc.print(f"training budget of {cfg.train.max_minutes} min spent after {epoch + 1} epochs")
                break
        bar.close()
        self.finish()
        return self.history

    def progress_bar(self, elapsed: float) -> tqdm:
        """Counts what bounds the run: training minutes under ``train.max_minutes``, else epochs."""
        cfg, quiet = self.cfg, not self.accelerator.is_main_process
        if cfg.train.max_minutes:
            return tqdm(total=float(cfg.train.max_minutes), initial=min(elapsed / 60, cfg.train.max_minutes),
                        desc="training", disable=quiet,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} min [{elapsed}{postfix}]")
        return tqdm(total=cfg.train.epochs, initial=self.start_epoch, desc="epochs", disable=quiet)

    def eval_due(self, epoch: int, elapsed: float) -> bool:
        """Every ``eval.every`` epochs, or with ``eval.every_minutes`` each time training time passes a multiple."""
        minutes = self.cfg.eval.get("every_minutes")
        if not minutes:
            return epoch % self.cfg.eval.every == 0
        evaluated = sum(1 for h in self.history if "geneval_overall" in h and h["epoch"] > 0)
        return elapsed >= 60 * minutes * (evaluated + 1)

    def budget_spent(self, elapsed: float) -> bool:
        """Whether ``train.max_minutes`` is used up; decided jointly so all processes stop together."""
        if not self.cfg.train.max_minutes:
            return False
        spent = torch.tensor(float(elapsed >= 60 * self.cfg.train.max_minutes), device=self.accelerator.device)
        return bool(self.accelerator.reduce(spent, reduction="max") > 0)

    def card(self) -> dict:
        """What a model card says about this run: base, objective, reward, steps and the last evaluation."""
        cfg = self.cfg
        evaluated = [h for h in self.history if "geneval_overall" in h]
        n = self.accelerator.num_processes
        launcher = f"accelerate launch --num_processes {n} -m finetune.cli" if n > 1 else "diffrl"
        return {"base_model": cfg.model.path, "objective": OmegaConf.to_container(cfg.objective, resolve=True),
                "reward": OmegaConf.to_container(cfg.reward, resolve=True) if not isinstance(cfg.reward, str)
                else cfg.reward, "epochs": self.history[-1]["epoch"] if self.history else 0,
                "optimizer_steps": self.global_step, "guidance_scale": cfg.model.guidance_scale,
                "num_steps": cfg.eval.num_steps, "eval": [evaluated[0], evaluated[-1]] if evaluated else [],
                "command": f"{launcher} train --config {self.out / 'config.yaml'}"}

    def finish(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, self.out / "config.yaml")  # the whole recipe: the model card's command reruns it
            card = self.card()
            with self.ema_weights():
                if self.objective.trains_denoiser and self.cfg.lora.enabled:
                    self.policy.save_lora(self.out / "lora")
                    write_denoiser_card(self.out / "lora", card, lora=True)
                elif self.objective.trains_denoiser:  # a complete pipeline folder that `from_pretrained` and --model load
                    save_pipeline(self.policy.pipe, self.out / "model")
                    write_denoiser_card(self.out / "model", card, lora=False)
                self.objective.export(self.out, card)
            (self.out / "history.json").write_text(json.dumps(self.history, indent=1) + "\n")
            plot_curves(self.history, self.out / "curves.png")
        acc.wait_for_everyone()
        acc.end_training()
