"""GenEval reward: per-image correctness under the official rules, on any detector backend.

``partial_credit=False`` (default): 1 if the image satisfies the whole prompt, else 0 — exactly the
GenEval metric. ``partial_credit=True``: the fraction of the prompt's include/exclude clauses that
hold (an include clause holds when its objects exist with the asked colour and position), a denser
signal in the spirit of Flow-GRPO's GenEval reward. The strict score is always logged as ``correct``.
"""

from __future__ import annotations

import torch

from eval.geneval import evaluate_image, get_backend
from rewards.base import Reward, RewardOutput, register, to_pil


@register("geneval")
class GenEvalReward(Reward):
    def __init__(self, backend: str = "shapes", partial_credit: bool = False):
        self.backend = get_backend(backend)
        self.partial_credit = partial_credit

    def __call__(self, images, prompts, metadata):
        for i, meta in enumerate(metadata):
            if not meta or "include" not in meta:
                raise ValueError(f"the geneval reward needs GenEval metadata for every prompt; prompt {i} "
                                 f"({prompts[i]!r}) has none: train on a metadata jsonl, not bare prompts")
        rows = [evaluate_image(self.backend, image, meta, with_clauses=True)
                for image, meta in zip(to_pil(images), metadata)]
        correct = torch.tensor([float(r["correct"]) for r in rows])
        partial = torch.tensor([sum(r["clauses"]) / max(1, len(r["clauses"])) for r in rows])
        return RewardOutput(partial if self.partial_credit else correct, {"correct": correct, "partial": partial})
