"""``diffrl demo``, the README's main job: RL on both shipped models at once, GenEval before and after.

Each recipe trains in its own process (one per core, so two recipes on two cores take the time of
one) for ``minutes`` of training, evaluated on the held-out split at the start, half way and at the
end. The report pairs the first and last evaluations image by image (same prompts, same seeds), so
each gain comes with its own standard error (``eval.geneval.paired_standard_error``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_RECIPES = ["configs/demo/ddpo_shapes_sd.yaml", "configs/demo/nft_full_shapes_flow.yaml"]


def keep_aside(run_dir: Path) -> None:
    """The demo starts from the base model; an earlier run's folder becomes NAME.previous."""
    if run_dir.exists():
        previous = run_dir.with_name(run_dir.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        run_dir.rename(previous)
        print(f"{run_dir} existed: moved to {previous} (replacing an older one)")


def training_minutes(run_dir: Path) -> float:
    """How far a running recipe is, from its latest checkpoint (0 before the first)."""
    from finetune import checkpoint

    try:
        folder = checkpoint.latest(run_dir / "checkpoints")
        return json.loads((folder / "state.json").read_text())["history"][-1]["time"] / 60 if folder else 0.0
    except (OSError, ValueError, KeyError, IndexError):  # a checkpoint being rotated while we read
        return 0.0


def train_all(recipes: list[str], out: Path, minutes: float, overrides: list[str], parallel: int,
              desc: str = "demo") -> dict[str, Path]:
    """Train the recipes, ``parallel`` at a time, each in its own process; one bar counts training minutes."""
    runs = {Path(recipe).stem: out / Path(recipe).stem for recipe in recipes}
    for run_dir in runs.values():
        keep_aside(run_dir)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    queue = list(zip(recipes, runs.values()))
    running: dict[Path, tuple[subprocess.Popen, object]] = {}
    bar = tqdm(total=minutes * len(recipes), desc=desc, mininterval=10,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} training min [{elapsed}{postfix}]")
    while queue or running:
        while queue and len(running) < parallel:
            recipe, run_dir = queue.pop(0)
            run_dir.mkdir(parents=True)
            log = open(run_dir.with_name(run_dir.name + ".log"), "w")
            cmd = [sys.executable, "-m", "finetune.cli", "train", "--config", recipe, f"output_dir={run_dir}",
                   f"train.max_minutes={minutes}", "train.epochs=100000", "eval.every=0",
                   f"eval.every_minutes={minutes / 2}", "resume=false", *overrides]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parents[1])}
            running[run_dir] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        time.sleep(2)
        for run_dir, (process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[run_dir]
                if process.returncode:
                    tail = run_dir.with_name(run_dir.name + ".log").read_text()[-3000:]
                    raise RuntimeError(f"{run_dir.name} failed (exit {process.returncode}):\n{tail}")
        done = sum(minutes if (d / "history.json").exists() else min(training_minutes(d), minutes)
                   for d in runs.values() if d.exists())
        bar.update(done - bar.n)
        bar.set_postfix_str(", ".join(f"{d.name} {training_minutes(d):.1f} min" for d in running) or "done",
                            refresh=False)
    bar.close()
    return runs


def finished_run(run_dir: Path) -> dict:
    """A finished run: its recipe, history, evaluations, the first and last evaluation folders and rows,
    and the gain between them with its paired standard error."""
    from omegaconf import OmegaConf

    from eval import geneval

    history = json.loads((run_dir / "history.json").read_text())
    evals = [h for h in history if "geneval_overall" in h]
    folders = [run_dir / "eval" / f"epoch-{h['epoch']:04d}" for h in (evals[0], evals[-1])]
    rows = [[json.loads(line) for line in (f / "results.jsonl").read_text().splitlines()] for f in folders]
    return {"cfg": OmegaConf.load(run_dir / "config.yaml"), "history": history, "evals": evals, "folders": folders,
            "rows": rows, "gain": evals[-1]["geneval_overall"] - evals[0]["geneval_overall"],
            "gain_se": geneval.paired_standard_error(*rows)}


def report(runs: dict[str, Path]) -> str:
    """Per-category table (base, tuned, gain ± its paired standard error), labelled grids, curves."""
    from eval import geneval
    from eval.report import category_table, comparison_grid

    summaries, gains = {}, []
    for name, run_dir in runs.items():
        r = finished_run(run_dir)
        cfg, evals, (first, last), gain, se = r["cfg"], r["evals"], r["folders"], r["gain"], r["gain_se"]
        label = f"{cfg.objective.name}, {evals[-1]['epoch']} epochs"
        summaries[f"{cfg.model.path} base"] = geneval.summarize(r["rows"][0])
        summaries[f"{cfg.model.path} + {label}"] = geneval.summarize(r["rows"][1])
        z = f"{gain / se:+.1f}" if se else "-"
        gains.append(f"| {cfg.model.path} | {name} | {evals[0]['geneval_overall']:.3f} | "
                     f"{evals[-1]['geneval_overall']:.3f} | {gain:+.3f} ± {se:.3f} | {z} | "
                     f"{evals[-1]['time'] / 60:.1f} |")
        comparison_grid({"base": first, label: last}, run_dir / "before_after.png")
    per_prompt = "/".join(sorted({str(s["total_images"] // s["total_prompts"]) for s in summaries.values()}))
    return "\n".join([
        f"GenEval-shapes, held-out eval split, {per_prompt} images per prompt, the same seeds before and after:", "",
        category_table(summaries), "",
        "| model | recipe | before | after | gain ± paired s.e. | gain / s.e. | training min |",
        "|---|---|---|---|---|---|---|", *gains])


def run(recipes: list[str], out: Path, minutes: float, overrides: list[str], parallel: int | None = None) -> str:
    started = time.time()
    parallel = parallel or min(len(recipes), os.cpu_count() or 1)
    runs = train_all(recipes, out, minutes, overrides, parallel)
    summary = report(runs) + f"\n\nWall time: {(time.time() - started) / 60:.1f} min.\n"
    (out / "summary.md").write_text(summary)
    return summary
