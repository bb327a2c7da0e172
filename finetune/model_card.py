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


def objective_name(card: dict) -> str:
    objective = card["objective"]
    return objective.get("name") if isinstance(objective, dict) else objective


def write_model_card(folder: str | Path, title: str, card: dict, usage: str, tags: list[str],
                     python: str | None = None) -> Path:
    """``folder``/README.md describing a run (``card`` as built by the trainer) and how to use its output:
    ``usage`` as shell commands, ``python`` (optional) as a diffusers snippet."""
    name = objective_name(card)
    description = "\n\n".join([
        f"# {title}",
        f"Trained with diffrl from `{card['base_model']}` with the "
        f"`{name}` objective for {card['epochs']} epoch{'s' * (card['epochs'] != 1)} "
        f"({card['optimizer_steps']} optimizer steps).",
        "## Training\n\n```json\n" + json.dumps({k: card[k] for k in ("objective", "reward", "guidance_scale")},
                                                indent=1) + "\n```",
        f"## Evaluation (GenEval rules, held-out prompts, {card['num_steps']} deterministic sampler steps)\n\n"
        + eval_table(card["eval"]),
        "## Use\n\n```bash\n" + usage + "\n```" + (f"\n\n```python\n{python}\n```" if python else ""),
        "## Reproduce\n\n```bash\n" + card.get("command", "") + "\n```",
    ])
    data = ModelCardData(license="apache-2.0", library_name="diffusers", base_model=card["base_model"])
    model_card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{description}\n"),
                                     tags=["diffrl", "text-to-image", *tags])
    path = Path(folder) / "README.md"
    model_card.save(str(path))
    return path


def write_denoiser_card(folder: Path, card: dict, lora: bool) -> Path:
    """The card of a run's LoRA (``output_dir/lora``) or fully fine-tuned pipeline (``output_dir/model``)."""
    name, base = objective_name(card), card["base_model"]
    if lora:
        usage = (f"diffrl eval geneval --model {base} --lora {folder} --out eval-{name}\n"
                 f"diffrl sample --model {base} --lora {folder} --metadata prompts.jsonl --out samples")
        python = f'{load_base(base)}\npipe.load_lora_weights("{folder}")'
        return write_model_card(folder, f"{name} LoRA for {base}", card, usage, ["lora", name], python)
    usage = (f"diffrl eval geneval --model {folder} --out eval-{name}\n"
             f"diffrl sample --model {folder} --metadata prompts.jsonl --out samples")
    python = load_base(str(folder))
    return write_model_card(folder, f"{base} fine-tuned with {name}", card, usage, [name], python)


def load_base(base: str) -> str:
    """Python that loads ``base``: diffusers for folders and hub ids, diffrl's loader for the shipped names."""
    from finetune.models.hub import SHIPPED

    if base in SHIPPED:
        return f'from finetune.models.hub import load_pipeline\npipe = load_pipeline("{base}")'
    return f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{base}")'


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a trained folder (LoRA, pipeline or noise policy, with its model card) to the hub; the URL."""
    from huggingface_hub import HfApi

    from finetune.models.hub import offline

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md model card; push a folder that training wrote "
                                "(output_dir/lora, output_dir/model or output_dir/noise_policy)")
    if offline():
        raise OSError("HF_HUB_OFFLINE=1: the hub is off; unset it on a machine that can reach the hub to push")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload from diffrl")
    return getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}"
