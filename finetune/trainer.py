"""The RL fine-tuning loop: sample -> reward -> advantages -> inner epochs of objective.loss.

Reads top to bottom like a recipe. Works unchanged under ``accelerate launch`` with several
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
from diffusers.utils.torch_utils import randn_tensor
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from finetune import checkpoint, distributed
from finetune.advantages import PerPromptStatTracker
from finetune.models import load_policy
from finetune.models.base import select
from finetune.models.hub import save_pipeline
from finetune.objectives import build_objective
from finetune.preflight import mixed_precision, preflight
from finetune.report import flat_hparams, plot_curves
from finetune.rollout import Rollout, concat, sample
from rewards.base import check_finite


def weight_dtype(dtype: str | None, mixed_precision: str) -> torch.dtype:
    """``model.dtype``, or by default the dtype of accelerate's mixed precision (fp32 without it)."""
    name = dtype or {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def epoch_generator(seed: int, epoch: int, rank: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1009 + rank) * 17 + purpose)


def step_batch(rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: torch.Tensor) -> dict:
    """The recorded transition x_t -> x_prev of sampler step ``k[i]`` of each sample ``idx[i]``."""
    return {
        "x_t": rollout.latents[idx, k], "x_prev": rollout.latents[idx, k + 1],
        "t": rollout.timesteps[k], "old_log_prob": rollout.log_probs[idx, k],
        "advantages": advantages[idx], "cond": select(rollout.cond, idx),
    }


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
        if cfg.lora.enabled:
            self.policy.add_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
            cast_training_params(self.policy.denoiser, torch.float32)
        else:
            if self.policy.denoiser.dtype != torch.float32:
                self.policy.denoiser.to(torch.float32)
            self.policy.denoiser.requires_grad_(True)
        if getattr(self.objective, "kl_beta", 0) > 0:
            self.policy.freeze_reference(self.weight_dtype)
        self.params = self.policy.trainable_parameters()
        self.objective.setup(self.policy, self.params)
        self.global_step = 0  # optimizer steps so far
        self.skipped_steps = self.nonfinite_in_a_row = 0  # optimizer steps skipped for NaN/inf loss or gradients
        optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, betas=(0.9, 0.999),
                                      weight_decay=cfg.train.weight_decay, eps=1e-8)
        # Optional EMA of the trained weights for eval and export; fp32: made before prepare may cast to bf16.
        self.ema = EMAModel(self.params, decay=cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.net, self.optimizer = distributed.prepare(self.accelerator, self.policy.denoiser, optimizer, cfg.train)
        a = cfg.advantage
        self.tracker = PerPromptStatTracker(a.buffer_size, a.min_count, a.global_std)
        self.history: list[dict] = []
        self.start_epoch = 0

    # -- checkpoints ------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.policy.denoiser.named_parameters() if p.requires_grad}

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
    def collect(self, epoch: int) -> tuple[Rollout, torch.Tensor, dict]:
        """Sample this process's prompt groups, score them, and turn rewards into advantages."""
        s, acc = self.cfg.sample, self.accelerator
        rng = random.Random(int(epoch_generator(self.cfg.seed, epoch, acc.process_index, 0).initial_seed()))
        groups = [self.pick_prompt(rng) for _ in range(s.groups_per_epoch)]
        records = [r for r in groups for _ in range(s.group_size)]
        gen = epoch_generator(self.cfg.seed, epoch, acc.process_index, 1)
        self.policy.net = self.policy.denoiser  # sample with the bare module, outside DDP
        parts, scores, infos = [], [], []
        if s.get("shared_noise"):
            # DanceGRPO's shared initial noise: a group differs only by the sampler's own noise, so
            # its reward spread (the advantage) measures the policy's actions, not the luck of x_T.
            group_noise = randn_tensor((len(groups), *self.policy.latent_shape()),
                                       generator=epoch_generator(self.cfg.seed, epoch, acc.process_index, 3))
            shared = group_noise.repeat_interleave(s.group_size, 0)
        for i in range(0, len(records), s.batch_size):
            chunk = records[i:i + s.batch_size]
            if s.get("shared_noise"):
                noise = shared[i:i + s.batch_size].to(acc.device)
            else:
                noise = randn_tensor((len(chunk), *self.policy.latent_shape()), generator=gen, device=acc.device)
            with self.objective.rollout_context(self.policy), distributed.autocast(acc):
                ro = sample(self.policy, [r["prompt"] for r in chunk], noise, chunk,
                            trajectory="trajectory" in self.objective.needs, generator=gen,
                            stochastic=not self.objective.deterministic_rollouts, window=self.sde_window(gen))
            out = self.reward(ro.images, ro.prompts, ro.metadata)
            scores.append(check_finite(out.scores.float(), self.reward.name))
            infos.append(out.info)
            ro.images = None  # scored: the decoded images are not needed again (GPU memory at 1024 px)
            parts.append(ro)
        rollout = concat(parts)
        rewards = torch.cat(scores)
        # Every process sees every prompt's rewards, so per-prompt statistics agree everywhere.
        all_rewards = acc.gather(rewards.to(acc.device)).cpu()
        all_prompts = gather_object(rollout.prompts) if acc.num_processes > 1 else rollout.prompts
        advantages = torch.as_tensor(self.tracker.update(all_prompts, all_rewards.numpy()), dtype=torch.float32)
        if self.cfg.advantage.per_epoch:
            self.tracker.clear()
        n = len(rewards)
        mine = advantages[acc.process_index * n:(acc.process_index + 1) * n]
        stats = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std())}
        for key in infos[0]:
            stats[f"reward/{key}"] = float(acc.gather(torch.cat([i[key] for i in infos]).float().to(acc.device)).mean())
        return rollout, mine.to(acc.device), stats

    def sde_window(self, gen: torch.Generator) -> tuple[int, int] | None:
        """Flow-GRPO-Fast: ``sample.sde_window_size`` consecutive stochastic steps per sampling batch,
        starting uniformly in ``sample.sde_window_range`` (default: the first half of the steps)."""
        size = self.cfg.sample.get("sde_window_size")
        if not size:
            return None
        steps = self.cfg.model.num_steps
        lo, hi = self.cfg.sample.get("sde_window_range") or (0, max(size, steps // 2))
        if not (0 <= lo <= hi - size and hi <= steps):
            raise ValueError(f"sample.sde_window_range [{lo}, {hi}] must hold a window of sample.sde_window_size "
                             f"{size} within model.num_steps {steps}; widen the range or shrink the window")
        start = int(torch.randint(lo, hi - size + 1, (1,), generator=gen))
        return start, start + size

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
        """Inner epochs of minibatches; gradients accumulate over each minibatch's training times."""
        acc = self.accelerator
        self.policy.net = self.net
        self.objective.start_epoch()
        # Each epoch starts a fresh accumulation: nothing left over from the last epoch (or from
        # before a resume) may leak into its first optimizer step.
        distributed.fresh_accumulation(acc, self.optimizer)
        logs: dict[str, list[float]] = {}
        if "trajectory" in self.objective.needs:
            batches = self.sampler_step_batches(epoch, rollout, advantages)
        else:
            batches = self.forward_process_batches(epoch, rollout, advantages)
        for batch in batches:
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

    def sampler_step_batches(self, epoch: int, rollout: Rollout, advantages: torch.Tensor):
        """(sample, recorded step) minibatches: DDPO's random timestep subset per sample."""
        t_cfg, acc = self.cfg.train, self.accelerator
        n, T = rollout.log_probs.shape
        random_steps = rollout.stochastic_steps  # deterministic steps have no log-prob to train
        if t_cfg.get("timestep_range") is not None:
            lo, hi = t_cfg.timestep_range
            if not 0 <= lo < hi <= T:
                raise ValueError(f"train.timestep_range [{lo}, {hi}] must lie within the {T} sampler steps "
                                 f"(model.num_steps) and hold at least one")
            in_range = torch.zeros(T, dtype=torch.bool)
            in_range[lo:hi] = True
            random_steps = random_steps & in_range.to(random_steps.device)
        counts = random_steps.sum(1)
        if counts.min() != counts.max() or counts.min() == 0:
            raise ValueError("every sample needs the same, non-zero number of stochastic steps to train on: "
                             "check sample.sde_window_size/range against train.timestep_range")
        n_train = max(1, int(int(counts[0]) * t_cfg.timestep_fraction))
        gen = epoch_generator(self.cfg.seed, epoch, acc.process_index, 2)
        distributed.set_accumulation(acc, n_train * t_cfg.gradient_accumulation_steps)
        for _ in range(t_cfg.inner_epochs):
            order = torch.randperm(n, generator=gen)
            steps = self.objective.train_steps(random_steps, n_train, gen)  # (n, n_train) step indices
            for start in range(0, n, t_cfg.batch_size):
                idx = order[start:start + t_cfg.batch_size]
                for j in range(n_train):
                    yield step_batch(rollout, advantages, idx, steps[idx, j])

    def forward_process_batches(self, epoch: int, rollout: Rollout, advantages: torch.Tensor):
        """(clean sample, training time, fresh noise) minibatches for forward-process objectives."""
        t_cfg, acc = self.cfg.train, self.accelerator
        n = len(rollout)
        gen = epoch_generator(self.cfg.seed, epoch, acc.process_index, 2)
        for _ in range(t_cfg.inner_epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, t_cfg.batch_size):
                idx = order[start:start + t_cfg.batch_size]
                times = self.objective.training_times(self.policy, len(idx), gen)  # (K, b)
                distributed.set_accumulation(acc, len(times) * t_cfg.gradient_accumulation_steps)
                x0 = rollout.final[idx]
                for t in times:
                    yield {"x0": x0, "eps": randn_tensor(x0.shape, generator=gen, device=x0.device),
                           "t": t.to(x0.device), "advantages": advantages[idx], "cond": select(rollout.cond, idx)}

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

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """GenEval-shapes on the held-out prompts with the deterministic sampler (main process)."""
        from eval import geneval
        from eval.generate import image_seed
        from eval.layout import write_prompt
        from eval.report import folder_grid
        from rewards.base import to_pil

        e = self.cfg.eval
        if not self.accelerator.is_main_process:
            return {}
        backend = geneval.get_backend(e.backend)
        folder = self.out / "eval" / f"epoch-{epoch:04d}"
        jobs = [(i, j) for i in range(len(self.eval_prompts)) for j in range(e.images_per_prompt)]
        rows, images = [], {}
        self.policy.net = self.policy.denoiser
        train_steps, self.policy.num_steps = self.policy.num_steps, e.num_steps
        train_guidance = self.policy.guidance_scale
        if e.get("guidance_scale") is not None:
            self.policy.guidance_scale = e.guidance_scale
        for start in range(0, len(jobs), self.cfg.sample.batch_size * 2):
            chunk = jobs[start:start + self.cfg.sample.batch_size * 2]
            noise = self.policy.initial_noise([image_seed(e.seed, i, j) for i, j in chunk])
            with distributed.autocast(self.accelerator):
                ro = sample(self.policy, [self.eval_prompts[i]["prompt"] for i, _ in chunk], noise, stochastic=False)
            for (i, j), image in zip(chunk, to_pil(ro.images)):
                rows.append(geneval.evaluate_image(backend, image, self.eval_prompts[i], f"{i:05d}/samples/{j:04d}.png"))
                images.setdefault(i, []).append(image)
        self.policy.num_steps, self.policy.guidance_scale = train_steps, train_guidance
        for i, ims in images.items():
            write_prompt(folder / "images", i, self.eval_prompts[i], ims)
        summary = geneval.write_results(rows, folder / "results.jsonl")
        folder_grid(folder / "images", folder / "grid.png")
        return {"geneval_overall": summary["overall"], "geneval_overall_se": summary["overall_se"],
                **{f"geneval/{k}": v["score"] for k, v in summary["tasks"].items()}}

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        self.maybe_resume()
        if acc.log_with:
            acc.init_trackers("diffrl", config=flat_hparams(OmegaConf.to_container(cfg, resolve=True)))
        if self.start_epoch == 0 and self.evaluates and not self.history:
            self.history.append({"epoch": 0, "time": 0.0, **self.evaluate(0)})
        elapsed = self.history[-1]["time"] if self.history else 0.0
        bar = tqdm(range(self.start_epoch, cfg.train.epochs), initial=self.start_epoch, total=cfg.train.epochs,
                   desc="epochs", disable=not acc.is_main_process)
        for epoch in bar:
            # Evaluation runs on the main process only; without this barrier the others would count
            # their wait for it as training time and the shared budget would end early.
            acc.wait_for_everyone()
            started = time.time()
            rollout, advantages, stats = self.collect(epoch)
            stats.update(self.optimize(epoch, rollout, advantages))
            elapsed += time.time() - started
            record = {"epoch": epoch + 1, "time": elapsed, **stats}
            stop = self.budget_spent(elapsed)
            last = epoch + 1 == cfg.train.epochs or stop
            if self.evaluates and (self.eval_due(epoch + 1, elapsed) or last):
                with self.ema_weights():
                    record.update(self.evaluate(epoch + 1))
            self.history.append(record)
            if acc.log_with:
                acc.log({k: v for k, v in record.items() if isinstance(v, float)}, step=epoch + 1)
            bar.set_postfix(reward=f"{stats['reward_mean']:.3f}")
            if (epoch + 1) % cfg.checkpoint.every == 0 or last:
                self.save(epoch + 1)
            if stop:
                acc.print(f"training budget of {cfg.train.max_minutes} min spent after {epoch + 1} epochs")
                break
        self.finish()
        return self.history

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

    def finish(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with self.ema_weights():
                if self.cfg.lora.enabled:
                    self.policy.save_lora(self.out / "lora")
                else:  # full fine-tuning: a complete pipeline folder that `from_pretrained` and --model load
                    save_pipeline(self.policy.pipe, self.out / "model")
            (self.out / "history.json").write_text(json.dumps(self.history, indent=1) + "\n")
            plot_curves(self.history, self.out / "curves.png")
        acc.wait_for_everyone()
        acc.end_training()
