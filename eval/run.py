"""End-to-end evaluations of a model (optionally with a trained LoRA): generate, then score.

Under ``accelerate launch`` the prompts are sharded across processes by index (prompt i goes to
process i mod N), every process scores its own images, and the main process gathers the rows and
writes the results once, in prompt order, so the files equal those of a single-process run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from finetune.models.hub import SHIPPED, call_kwargs


def load_records(source: str) -> list[dict]:
    """``shapes:train`` / ``shapes:eval`` or a GenEval-style metadata jsonl."""
    from eval.shapes import grammar

    if source.startswith("shapes:"):
        return grammar.split(source.split(":", 1)[1])
    return grammar.read_jsonl(source)


def default_metadata(model: str) -> str:
    """The shapes eval split for the shipped shapes models, GenEval's own prompts otherwise."""
    from eval.geneval import GENEVAL_METADATA

    return "shapes:eval" if model in SHIPPED else str(GENEVAL_METADATA)


def default_backend(metadata: str, records: list[dict] | None = None) -> str:
    """The shapes detector for shapes prompts (a ``shapes:`` split, or a file naming only shapes classes)."""
    from eval.shapes.grammar import CLASSES

    classes = {c["class"] for r in records or [] for c in r["include"] + r.get("exclude", [])}
    return "shapes" if metadata.startswith("shapes:") or (classes and classes <= set(CLASSES)) else "hf"


def _state():
    from accelerate import PartialState

    return PartialState()


def _gather(rows: list) -> list:
    from accelerate.utils import gather_object

    state = _state()
    return gather_object(rows) if state.num_processes > 1 else rows


def _sampler(steps, guidance) -> dict:
    return {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance)) if v is not None}


def load_noise_policy(folder: str | None, device=None):
    if folder is None:
        return None
    from finetune.noise_policy import NoisePolicy

    return NoisePolicy.load(folder, device)


def geneval_model(model: str, out: str | Path, lora: str | None = None, metadata: str | None = None,
                  backend: str | None = None, images_per_prompt: int = 4, seed: int = 0, batch_size: int = 32,
                  steps: int | None = None, guidance: float | None = None,
                  noise_policy: str | None = None, condition: str | None = None, progress: bool = True) -> dict | None:
    """Generate ``out/images`` (GenEval layout), score it, write ``out/results.jsonl``, a grid and per-task grids.

    ``noise_policy``: a FIND run's ``output_dir/noise_policy``, which draws each image's x_T.
    ``condition``: the class to sample with a CTRL LoRA (None: the null class)."""
    from eval import geneval
    from eval.generate import generate
    from eval.report import category_grids, folder_grid
    from finetune.models.hub import load_pipeline, resolve

    resolve(model)  # a wrong --model fails first, before prompts or the detector load
    metadata = metadata or default_metadata(model)
    records = load_records(metadata)
    detector = geneval.get_backend(backend or default_backend(metadata, records))
    if hasattr(detector, "check_classes"):  # loads the detector: a missing model fails before generating
        detector.check_classes({c["class"] for r in records for c in r["include"]})
    state = _state()
    starts = load_noise_policy(noise_policy, state.device)  # a bad folder fails before the model loads
    pipe = load_pipeline(model, lora=lora, condition=condition).to(state.device)
    mine = list(range(state.process_index, len(records), state.num_processes))
    out = Path(out)
    rows = []

    def score(i: int, j: int, image) -> None:  # as each image is made: no reading it back from disk
        rows.append(geneval.evaluate_image(detector, image, records[i], f"{i:05d}/samples/{j:04d}.png"))

    generate(pipe, records, out / "images", images_per_prompt, seed, batch_size,
             progress=progress and state.is_main_process, prompt_indices=mine, noise_policy=starts, on_image=score,
             **_sampler(steps, guidance))
    rows = sorted(_gather(rows), key=lambda r: r["filename"])
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    summary = geneval.write_results(rows, out / "results.jsonl")
    folder_grid(out / "images", out / "grid.png")
    category_grids(out / "images", rows, out / "grids", per_prompt=images_per_prompt)
    return summary


def mean_ci(values) -> dict:
    """Mean, sample std and the normal-approximation 95 % confidence interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    half = 1.96 * std / math.sqrt(len(x))
    return {"mean": float(x.mean()), "std": std, "ci95": [float(x.mean()) - half, float(x.mean()) + half], "n": len(x)}


def reward_model(model: str, rewards: list[str], prompts: str, lora: str | None = None, images_per_prompt: int = 4,
                 seed: int = 0, batch_size: int = 32, steps: int | None = None,
                 guidance: float | None = None, noise_policy: str | None = None,
                 condition: str | None = None) -> dict[str, dict] | None:
    """Score a model's samples of ``prompts`` with each reward: {reward: mean/std/ci95/n}."""
    from eval.generate import SHAPES_SAMPLER, image_seed, seeded_starts
    from finetune.models.hub import load_pipeline, resolve
    from rewards.base import build_reward, check_finite

    resolve(model)
    records = load_records(prompts)
    scorers = [build_reward(name) for name in rewards]  # fail before generating
    state = _state()
    starts = load_noise_policy(noise_policy, state.device)
    pipe = load_pipeline(model, lora=lora, condition=condition).to(state.device)
    seeded = seeded_starts(pipe, starts)
    sampler = {**SHAPES_SAMPLER, **call_kwargs(pipe), **_sampler(steps, guidance)}
    jobs = [(i, j) for i in range(state.process_index, len(records), state.num_processes)
            for j in range(images_per_prompt)]
    scores: dict[str, list[float]] = {name: [] for name in rewards}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        prompts_ = [records[i]["prompt"] for i, _ in chunk]
        latents = seeded([image_seed(seed, i, j) for i, j in chunk], prompts_).to(pipe.device, pipe.dtype)
        images = pipe(prompt=prompts_, latents=latents, output_type="pt", **sampler).images
        for name, scorer in zip(rewards, scorers):
            out = scorer(images.float().clamp(0, 1), prompts_, [records[i] for i, _ in chunk])
            scores[name] += check_finite(out.scores.float(), name).tolist()
    gathered = {name: [s for part in _gather([scores[name]]) for s in part] for name in rewards}
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return {name: mean_ci(values) for name, values in gathered.items()}


def compare_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per run, one column per reward, 'mean ± ci half-width'."""
    names = list(next(iter(results.values())))
    lines = ["| run | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for run, stats in results.items():
        cells = [f"{s['mean']:.4f} ± {(s['ci95'][1] - s['ci95'][0]) / 2:.4f}" for s in (stats[n] for n in names)]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
