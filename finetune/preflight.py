"""Everything a training run can be refused for, checked before any model loads.

A typo in a key, a reward name or a path should cost seconds, not the minutes of a model load, and
must never cost a checkpoint. ``preflight(cfg)`` returns what it had to build to check (prompts,
reward, objective) so that the trainer does not build them twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune import checkpoint
from finetune.config import check_keys

PRECISIONS = (None, "no", "fp16", "bf16")
DTYPES = (None, "fp32", "fp16", "bf16")


@dataclass
class Checked:
    train_prompts: list[dict]
    eval_prompts: list[dict]
    reward: object
    objective: object
    family: str | None  # None: a hub id not yet downloaded; the trainer checks it after the load


def load_prompts(source: str, field: str = "prompts.train") -> list[dict]:
    """``shapes:train`` / ``shapes:eval`` or a GenEval-style metadata jsonl."""
    from eval.run import load_records

    if not str(source).startswith("shapes:") and not Path(source).is_file():
        raise FileNotFoundError(f"config field `{field}`: no such file {source}; give a GenEval-style metadata "
                                "jsonl, or shapes:train / shapes:eval")
    try:
        return load_records(source)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"config field `{field}`: {err}") from None


def mixed_precision(cfg: DictConfig) -> str | None:
    """``train.mixed_precision``; YAML reads a bare ``no`` as false."""
    value = cfg.train.get("mixed_precision")
    return "no" if value is False else value


def check_values(cfg: DictConfig) -> None:
    t, s = cfg.train, cfg.sample
    if mixed_precision(cfg) not in PRECISIONS:
        raise ValueError(f"train.mixed_precision must be null (the accelerate config decides), no, fp16 or bf16; "
                         f"got {t.mixed_precision!r}")
    if cfg.model.get("dtype") not in DTYPES:
        raise ValueError(f"model.dtype must be null (follow train.mixed_precision), fp32, fp16 or bf16; "
                         f"got {cfg.model.dtype!r}")
    size = cfg.model.get("resolution")
    if size is not None and (not isinstance(size, int) or size <= 0 or size % 16):
        raise ValueError(f"model.resolution must be null (the model's own) or a positive multiple of 16 pixels "
                         f"(VAE downsampling x 2x2 patches), got {size!r}")
    cache = cfg.model.get("embedding_cache", 0)
    if not isinstance(cache, int) or isinstance(cache, bool) or cache < 0:
        raise ValueError(f"model.embedding_cache must be a number of prompts >= 0 (0 turns the cache off), got {cache!r}")
    if int(t.ema_every) < 1:
        raise ValueError(f"train.ema_every must be >= 1 (optimizer steps between EMA updates), got {t.ema_every}")
    if int(t.get("max_nonfinite_steps", 1)) < 1:
        raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    for key in ("groups_per_epoch", "group_size", "batch_size"):
        if int(s[key]) < 1:
            raise ValueError(f"sample.{key} must be >= 1, got {s[key]}")
    if cfg.checkpoint.keep < 0:
        raise ValueError(f"checkpoint.keep must be >= 0 (0 keeps every checkpoint), got {cfg.checkpoint.keep}")
    if t.batch_size < 1 or t.gradient_accumulation_steps < 1:
        raise ValueError(f"train.batch_size and train.gradient_accumulation_steps must be >= 1, "
                         f"got {t.batch_size} and {t.gradient_accumulation_steps}")


def check_output_dir(cfg: DictConfig) -> None:
    found = checkpoint.checkpoints(Path(cfg.output_dir) / "checkpoints")
    if found and not cfg.resume:
        raise ValueError(f"output_dir {cfg.output_dir} holds checkpoints of an earlier run (newest: {found[-1][1].name}) "
                         "and resume=false would overwrite them: set resume=true to continue that run, or pick "
                         "a new output_dir")


def preflight(cfg: DictConfig) -> Checked:
    from finetune.models import peek_family
    from finetune.objectives import build_objective
    from rewards.base import build_reward

    check_keys(cfg)
    check_values(cfg)
    train_prompts = load_prompts(cfg.prompts.train)
    evaluates = bool(cfg.eval.every or cfg.eval.get("every_minutes"))
    eval_prompts = load_prompts(cfg.prompts.eval, "prompts.eval") if evaluates else []
    spec = cfg.reward if isinstance(cfg.reward, str) else OmegaConf.to_container(cfg.reward, resolve=True)
    reward = build_reward(spec)
    family = peek_family(cfg.model.path)
    options = dict(cfg.objective)
    objective = build_objective(options.pop("name"), family, **options)
    objective.check_batching(cfg)
    objective.check_reward(reward)
    objective.prepare_data(cfg, eval_prompts)
    if cfg.model.get("sde_type") and family == "sd":
        raise ValueError(f"model.sde_type={cfg.model.sde_type!r} applies to flow models; {cfg.model.path} is an "
                         f"epsilon model (its DDIM step is set by model.noise, the eta)")
    check_output_dir(cfg)
    return Checked(train_prompts, eval_prompts, reward, objective, family)
