"""A README.md model card beside what a run trained, ready for ``huggingface_hub.upload_folder``.

The card's metadata and tags come from huggingface_hub's ``ModelCardData`` and diffusers'
``populate_model_card``; it is written locally without asking the hub anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData


def eval_table(evaluated: list[dict]) -> str:
    """GenEval-shapes before and after, as a markdown table (rows: the run's first and last evaluations)."""
    if not evaluated:
        return "No evaluation ran during training."
    tasks = sorted({k.split("/", 1)[1] for h in evaluated for k in h if k.startswith("geneval/")})
    lines = ["| epoch | overall | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for h in evaluated:
        cells = [f"{h.get(f'geneval/{t}', float('nan')):.3f}" for t in tasks]
        lines.append(f"| {h['epoch']} | {h['geneval_overall']:.3f} ± {h.get('geneval_overall_se', 0):.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_model_card(folder: str | Path, title: str, card: dict, usage: str, tags: list[str]) -> Path:
    """``folder``/README.md describing a run (``card`` as built by the trainer) and how to use its output."""
    objective = card["objective"]
    name = objective.get("name") if isinstance(objective, dict) else objective
    description = "\n\n".join([
        f"# {title}",
        f"Trained with diffrl from `{card['base_model']}` with the "
        f"`{name}` objective for {card['epochs']} epochs ({card['optimizer_steps']} optimizer steps).",
        "## Training\n\n```json\n" + json.dumps({k: card[k] for k in ("objective", "reward", "guidance_scale")},
                                                indent=1) + "\n```",
        f"## Evaluation (GenEval rules, held-out prompts, {card['num_steps']} deterministic sampler steps)\n\n"
        + eval_table(card["eval"]),
        "## Use\n\n```bash\n" + usage + "\n```",
    ])
    data = ModelCardData(license="apache-2.0", library_name="diffusers", base_model=card["base_model"])
    model_card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{description}\n"),
                                     tags=["diffrl", "text-to-image", *tags])
    path = Path(folder) / "README.md"
    model_card.save(str(path))
    return path
