"""The trainer's in-loop evaluation: GenEval on held-out prompts with the deterministic sampler.

The same seeds per (prompt, image) as ``diffrl sample``, so an in-loop score and the score of the
exported model sampled by the CLI agree. Every process evaluates its share of the batches (batch k
goes to process k mod world size; the batches are those of a single-process run, so each image is
computed exactly as it would be there), writes its images into the shared folder, and the rows are
gathered once to the main process, which writes the results.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from finetune import distributed
from finetune.models.base import Policy
from finetune.rollout import sample


@torch.no_grad()
def evaluate_geneval(policy: Policy, accelerator, prompts: list[dict], e: DictConfig, batch_size: int,
                     folder: Path, initial_latents=None, shard: tuple[int, int] | None = None) -> dict:
    """Score ``e.images_per_prompt`` images per prompt with ``e.num_steps`` ODE / DDIM-eta-0 steps and
    ``e.guidance_scale`` (default: the policy's); write images, results.jsonl and a grid to ``folder``.

    Every process calls it and returns the same scores; the main process writes the files. ``shard`` =
    (rank, world) overrides the accelerator's (``(0, 1)``: this process evaluates everything alone).
    ``initial_latents(policy, prompts, eps)`` maps each image's seeded noise to its x_T (a noise policy)."""
    from accelerate.utils import gather_object

    from eval import geneval
    from eval.generate import image_seed
    from eval.layout import write_sample
    from eval.report import folder_grid
    from rewards.base import to_pil

    rank, world = shard or (accelerator.process_index, accelerator.num_processes)
    backend = geneval.get_backend(e.backend)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(e.images_per_prompt)]
    batches = [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]
    rows = []
    train_settings = policy.num_steps, policy.guidance_scale
    policy.num_steps = e.num_steps
    if e.get("guidance_scale") is not None:
        policy.guidance_scale = e.guidance_scale
    try:
        for chunk in tqdm(batches[rank::world], desc="evaluating", leave=False, disable=rank != 0):
            noise = policy.initial_noise([image_seed(e.seed, i, j) for i, j in chunk])
            texts = [prompts[i]["prompt"] for i, _ in chunk]
            if initial_latents is not None:
                noise = initial_latents(policy, texts, noise)
            with distributed.autocast(accelerator):
                ro = sample(policy, texts, noise, stochastic=False)
            for (i, j), image in zip(chunk, to_pil(ro.images)):
                rows.append(geneval.evaluate_image(backend, image, prompts[i], f"{i:05d}/samples/{j:04d}.png"))
                write_sample(folder / "images", i, j, prompts[i], image)
    finally:
        policy.num_steps, policy.guidance_scale = train_settings
    if world > 1:  # one collective, after every process has written its images
        rows = gather_object(rows)
    rows = sorted(rows, key=lambda r: r["filename"])
    if rank == 0:
        summary = geneval.write_results(rows, folder / "results.jsonl")
        folder_grid(folder / "images", folder / "grid.png")
    else:  # the same scores everywhere, so every process's history (and its eval schedule) agrees
        summary = geneval.summarize(rows)
    return {"geneval_overall": summary["overall"], "geneval_overall_se": summary["overall_se"],
            **{f"geneval/{k}": v["score"] for k, v in summary["tasks"].items()}}
