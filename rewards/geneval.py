"""GenEval reward: per-image correctness under the official rules, on any detector backend.

``partial_credit``:

- ``false`` (default): 1 if the image satisfies the whole prompt, else 0 -- exactly the GenEval metric;
- ``true``: the fraction of the prompt's include/exclude clauses that hold (an include clause holds
  when its objects exist with the asked colour and position);
- ``"graded"``: Flow-GRPO's GenEval training reward (Liu et al., 2025), the mean of graded terms:
  per include clause asking for n objects of which k are detected, 1 - |n - k| / n; then, if the
  clause names a colour, 1 - |n - k_c| / n for k_c of them in that colour, and if it names a
  position, 1 or 0 for the relation (both 0 when k != n). Wrong counts earn credit by how far off
  they are, so counting prompts give a signal before any image is exactly right.

  How it differs from the reference reward code (``reward_server/gen_eval.py``, ``evaluate_reward``,
  of yifan123/reward-server, which Flow-GRPO trains with):

  * a failed position relation scores [0] here; the reference appends 0.0 and then, unconditionally,
    1.0, so a wrong relation earns half credit for that clause (and a right one [1.0]). Read as a bug:
    a model that puts the objects anywhere would earn credit for the relation it was asked to get
    right. A missing target object scores 0 in both.
  * a clause with the wrong count scores one 0 for each of its colour and position attributes here,
    one 0 in all in the reference (GenEval's prompts never put both on one clause, so no prompt of
    GenEval or of the shapes world scores differently);
  * everything else is the same: the count term is not clamped (it goes below 0 when more than 2n
    objects are found), exclude clauses add no term, and the detector settings are GenEval's.

The strict score is always logged as ``correct``, the clause fraction as ``partial``.
"""

from __future__ import annotations

import torch

from eval.geneval import evaluate_image, get_backend
from rewards.base import Reward, RewardOutput, register, to_pil


@register("geneval")
class GenEvalReward(Reward):
    """GenEval's official rules on a detector: 1 when the image satisfies the prompt; partial_credit: true/graded."""

    needs = "nothing for shapes prompts (rule detector); backend=hf: Mask2Former + CLIP weights"

    def __init__(self, backend: str = "shapes", partial_credit: bool | str = False):
        if partial_credit not in (False, True, "graded"):
            raise ValueError(f"reward.partial_credit must be false, true or 'graded', not {partial_credit!r}")
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
        info = {"correct": correct, "partial": partial}
        if self.partial_credit == "graded":
            info["graded"] = torch.tensor([sum(r["graded"]) / max(1, len(r["graded"])) for r in rows])
            return RewardOutput(info["graded"], info)
        return RewardOutput(partial if self.partial_credit else correct, info)
