"""``diffrl bench throughput``: where a run's time goes, each number beside its floor, in one run.

- **rollout**: the sampler recording the trajectory and log-probs against the plain diffusers
  pipeline on the same prompts, noise, steps and guidance (the rollout's floor).
- **epoch**: a recipe's epochs split by phase (``finetune/timing.py``); each phase beside the
  model-math floor of the calls it made, replayed alone (``finetune/bench/calls.py``).
- **evaluation**: the in-loop GenEval evaluation and ``diffrl eval geneval`` against the plain
  pipeline generating the same images.
- **scaling**: the recipe under ``accelerate launch`` with 1..N processes, samples per second over
  the whole wall clock, evaluation and waits included.
- **objectives**: images/s of each recipe's epoch and, on CUDA, its peak memory.

Timings are medians over repeats after a warm-up; on CPU each process gets ``--threads`` threads.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune.bench.calls import CallRecorder, seconds
from finetune.models.hub import call_kwargs

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("sample", "reward", "gather", "optimize", "evaluate", "checkpoint", "wait")


def rollout_vs_pipeline(model: str, device: torch.device, prompts: int = 16, steps: int = 10,
                        guidance: float = 4.0, repeats: int = 3) -> dict:
    from eval.shapes import grammar
    from finetune.models import load_policy
    from finetune.rollout import sample

    policy = load_policy(model, guidance, steps)
    policy.pipe.to(device)
    texts = [r["prompt"] for r in grammar.split("eval")[:prompts]]
    noise = policy.initial_noise(list(range(prompts)))
    sync = device.type == "cuda"

    def rollout():
        sample(policy, texts, noise, trajectory=True, stochastic=True, generator=torch.Generator().manual_seed(0))

    def pipeline():
        with torch.no_grad():
            policy.pipe(prompt=texts, latents=noise, num_inference_steps=steps, guidance_scale=guidance,
                        output_type="pt", **call_kwargs(policy.pipe))

    plain, ours = seconds(pipeline, repeats, sync), seconds(rollout, repeats, sync)
    return {"model": model, "images": prompts, "steps": steps, "guidance": guidance,
            "pipeline_s": plain, "rollout_s": ours, "ratio": ours / plain}


def networks(policy) -> dict[str, torch.nn.Module]:
    named = {"denoiser": policy.denoiser, "vae_decoder": policy.pipe.vae.decoder}
    named.update({f"text_encoder_{i}": m for i, m in enumerate(policy.text_encoders())})
    return named


def epoch_split(recipe: str, overrides: list[str], epochs: int, out: Path) -> dict:
    """Run the recipe in this process; median seconds per phase and epoch, beside the calls' floor."""
    from finetune import distributed
    from finetune.config import load_config
    from finetune.trainer import Trainer

    cfg = load_config(recipe, [*overrides, f"output_dir={out}", f"train.epochs={epochs}", "resume=false",
                               "train.max_minutes=null", "log.tensorboard=false", "log.wandb=false"])
    trainer = Trainer(cfg)
    recorder = CallRecorder(networks(trainer.policy), lambda: trainer.phases.current)
    history = trainer.train()
    epochs_run = [h for h in history if h["epoch"] > 0]
    evals = [h["time/evaluate"] for h in history if "time/evaluate" in h]
    counted = {"sample": len(epochs_run), "optimize": len(epochs_run), "reward": len(epochs_run),
               "evaluate": max(len(evals), 1)}
    floor = {phase: s / counted.get(phase, 1)
             for phase, s in recorder.floor(context=lambda: distributed.autocast(trainer.accelerator)).items()}
    phases = {p: statistics.median(h.get(f"time/{p}", 0.0) for h in epochs_run) for p in PHASES if p != "evaluate"}
    phases["evaluate"] = statistics.median(evals) if evals else 0.0
    samples = cfg.sample.groups_per_epoch * cfg.sample.group_size
    model_math = phases["sample"] + phases["optimize"]
    model_floor = floor.get("sample", 0.0) + floor.get("optimize", 0.0)
    return {"recipe": recipe, "epochs": len(epochs_run), "samples_per_epoch": samples, "phases": phases,
            "floor": floor, "sample_optimize_s": model_math, "sample_optimize_floor_s": model_floor,
            "ratio": model_math / model_floor if model_floor else None,
            "images_per_s": samples / sum(phases[p] for p in ("sample", "reward", "gather", "optimize"))}


def evaluation_vs_floor(model: str, device: torch.device, out: Path, images_per_prompt: int = 4,
                        steps: int = 20, guidance: float = 1.0, batch_size: int = 32) -> dict:
    """In-loop evaluation and ``diffrl eval geneval`` against the bare pipeline on the same images."""
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from eval.generate import image_seed
    from eval.run import geneval_model, load_records
    from finetune.evaluation import evaluate_geneval
    from finetune.models import load_policy

    records = load_records("shapes:eval")
    policy = load_policy(model, guidance, steps)
    policy.pipe.to(device)
    jobs = [(i, j) for i in range(len(records)) for j in range(images_per_prompt)]
    batches = [jobs[k:k + batch_size] for k in range(0, len(jobs), batch_size)]
    sync = device.type == "cuda"

    def floor():
        with torch.no_grad():
            for chunk in batches:
                noise = policy.initial_noise([image_seed(0, i, j) for i, j in chunk])
                policy.pipe(prompt=[records[i]["prompt"] for i, _ in chunk], latents=noise, num_inference_steps=steps,
                            guidance_scale=guidance, output_type="pt", **call_kwargs(policy.pipe))

    e = OmegaConf.create({"images_per_prompt": images_per_prompt, "num_steps": steps, "guidance_scale": guidance,
                          "backend": "shapes", "seed": 0})
    accelerator = Accelerator(cpu=device.type == "cpu")

    def in_loop():
        evaluate_geneval(policy, accelerator, records, e, batch_size, out / "in_loop", shard=(0, 1))

    def cli():
        geneval_model(model, out / "cli", images_per_prompt=images_per_prompt, batch_size=batch_size, steps=steps,
                      guidance=guidance, progress=False)

    n = len(jobs)
    rows = {"pipeline floor": seconds(floor, 1, sync), "in-loop evaluation": seconds(in_loop, 1, sync),
            "diffrl eval geneval": seconds(cli, 1, sync)}
    return {"model": model, "images": n, "steps": steps, "guidance": guidance,
            "rows": {name: {"seconds": s, "images_per_s": n / s, "ratio": s / rows["pipeline floor"]}
                     for name, s in rows.items()}}


def scaling(recipe: str, overrides: list[str], processes: list[int], epochs: int, out: Path, threads: int,
            cpu: bool) -> list[dict]:
    """The recipe under ``accelerate launch --num_processes N``: samples/s over the whole wall clock."""
    from finetune.config import load_config

    s = load_config(recipe, overrides).sample
    per_process = s.groups_per_epoch * s.group_size
    rows = []
    for n in processes:
        folder = out / f"processes-{n}"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *(["--multi_gpu"] if n > 1 else []),
               "-m", "finetune.cli", "train", "--config", recipe, *overrides, f"output_dir={folder}",
               f"train.epochs={epochs}", "resume=false", "train.max_minutes=null", "log.tensorboard=false",
               *(["cpu=true"] if cpu else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{n}-process run failed:\n{done.stderr[-3000:]}")
        history = json.loads((folder / "history.json").read_text())
        samples = sum(1 for h in history if h["epoch"] > 0) * n * per_process
        wall = history[-1]["wall"]
        rows.append({"processes": n, "samples": samples, "wall_s": wall, "samples_per_s": samples / wall,
                     "process_s": time.perf_counter() - started, "train_s": history[-1]["time"],
                     "evaluate_s": sum(h.get("time/evaluate", 0.0) for h in history),
                     "wait_s": sum(h.get("time/wait", 0.0) for h in history)})
    for row in rows:  # against the first row; training alone: sampling + reward + optimisation time
        row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]
        row["train_speedup"] = row["samples"] / row["train_s"] / (rows[0]["samples"] / rows[0]["train_s"])
    return rows


def objective_row(recipe: str, overrides: list[str], out: Path, epochs: int = 2) -> dict:
    """Images/s of the recipe's last epoch (sampling, reward and training) and, on CUDA, its peak memory."""
    from finetune.config import load_config
    from finetune.trainer import Trainer

    cfg = load_config(recipe, [*overrides, f"output_dir={out}", f"train.epochs={epochs}", "resume=false",
                               "eval.every=0", "eval.every_minutes=null", "train.max_minutes=null",
                               "log.tensorboard=false", "log.wandb=false"])
    cuda = torch.cuda.is_available() and not cfg.cpu
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    last = Trainer(cfg).train()[-1]
    spent = sum(last.get(f"time/{p}", 0.0) for p in ("sample", "reward", "gather", "optimize"))
    return {"recipe": recipe, "objective": cfg.objective.name, "model": cfg.model.path,
            "images_per_s": cfg.sample.groups_per_epoch * cfg.sample.group_size / spent,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def describe(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {threads} thread(s) per process of {os.cpu_count()} cores"


def run(models: list[str], recipe: str, overrides: list[str], epochs: int, processes: list[int], threads: int,
        parts: list[str], objective_recipes: list[str], out: Path, cpu: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(threads)
        overrides = [*overrides, "cpu=true"]
    result = {"device": describe(device, threads), "torch": torch.__version__, "recipe": recipe,
              "overrides": overrides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "rollout" in parts:
            result["rollout"] = [rollout_vs_pipeline(m, device) for m in models]
        if "epoch" in parts:
            result["epoch"] = epoch_split(recipe, overrides, epochs, tmp / "epoch")
        if "evaluation" in parts:
            result["evaluation"] = evaluation_vs_floor(models[0], device, tmp / "evaluation")
        if "scaling" in parts:
            result["scaling"] = scaling(recipe, [o for o in overrides if o != "cpu=true"], processes, epochs,
                                        tmp / "scaling", threads, device.type == "cpu")
        if objective_recipes:
            result["objectives"] = [objective_row(r, overrides, tmp / f"objective-{i}")
                                    for i, r in enumerate(objective_recipes)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "throughput.md").write_text(report(result))
    return result


def report(r: dict) -> str:
    """The result as markdown tables."""
    lines = [f"# diffrl bench throughput: {r['device']}, torch {r['torch']}", ""]
    if "rollout" in r:
        x = r["rollout"][0]
        lines += [f"## Rollout (trajectory + log-probs) vs the plain pipeline: {x['images']} prompts, "
                  f"{x['steps']} steps, guidance {x['guidance']}", "",
                  "| model | pipeline s | rollout s | ratio |", "|---|---|---|---|"]
        lines += [f"| {x['model']} | {x['pipeline_s']:.2f} | {x['rollout_s']:.2f} | {x['ratio']:.2f}x |"
                  for x in r["rollout"]]
        lines.append("")
    if "epoch" in r:
        e = r["epoch"]
        lines += [f"## One epoch of `{e['recipe']}` ({e['samples_per_epoch']} samples; median of {e['epochs']} "
                  "epochs, evaluation per evaluation)", "", "| phase | seconds | model-math floor | ratio |",
                  "|---|---|---|---|"]
        for phase, s in e["phases"].items():
            f = e["floor"].get(phase)
            lines.append(f"| {phase} | {s:.2f} | {f'{f:.2f}' if f else '-'} | {f'{s / f:.2f}x' if f else '-'} |")
        lines += [f"| **sample + optimize** | {e['sample_optimize_s']:.2f} | {e['sample_optimize_floor_s']:.2f} | "
                  f"**{e['ratio']:.2f}x** |", "", f"Training throughput: {e['images_per_s']:.1f} images/s.", ""]
    if "evaluation" in r:
        v = r["evaluation"]
        lines += [f"## Evaluation vs the bare pipeline: {v['model']}, {v['images']} images, {v['steps']} steps, "
                  f"guidance {v['guidance']}", "", "| path | seconds | images/s | vs floor |", "|---|---|---|---|"]
        lines += [f"| {name} | {x['seconds']:.1f} | {x['images_per_s']:.1f} | {x['ratio']:.2f}x |"
                  for name, x in v["rows"].items()]
        lines.append("")
    if "scaling" in r:
        lines += ["## Processes (`accelerate launch`): samples/s over the whole wall clock, evaluation included", "",
                  "| processes | samples | wall s | samples/s | speed-up | training alone | evaluating s | waiting s |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['processes']} | {x['samples']} | {x['wall_s']:.1f} | {x['samples_per_s']:.2f} | "
                  f"{x['speedup']:.2f}x | {x['train_speedup']:.2f}x | {x['evaluate_s']:.1f} | {x['wait_s']:.1f} |"
                  for x in r["scaling"]]
        lines.append("")
    if "objectives" in r:
        lines += ["## Objectives", "", "| recipe | objective | images/s | peak memory GiB |", "|---|---|---|---|"]
        for x in r["objectives"]:
            memory = f"{x['peak_memory_gib']:.2f}" if x["peak_memory_gib"] is not None else "-"
            lines.append(f"| {x['recipe']} | {x['objective']} | {x['images_per_s']:.1f} | {memory} |")
        lines.append("")
    return "\n".join(lines)
