"""``diffrl bench objectives``: the leaderboard. Every objective trains on its shapes model for the same
wall-clock budget (``finetune/demo.py``'s runner: one recipe per core), evaluated on the held-out split
at the start, half way and at the end with the same seeds; the gain carries its paired standard error.

Writes ``leaderboard.json`` (every evaluation of every run), ``leaderboard.md`` (the table) and
``leaderboard.png`` (GenEval-shapes against training seconds, ± the image-sampling standard error),
and with ``--readme`` replaces the table between the README's leaderboard markers; ``--from-json``
rebuilds all of that from a saved ``leaderboard.json`` (the repository keeps ``docs/leaderboard.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

# CPU-sized recipes per objective, on the shipped models they are measured on (DiffusionNFT
# trains both families: one recipe each).
RECIPES = {
    "ddpo": ["configs/demo/ddpo_shapes_sd.yaml"],
    "loop": ["configs/demo/loop_shapes_sd.yaml"],
    "flow_grpo": ["configs/demo/flow_grpo_shapes_flow.yaml"],
    "g2rpo": ["configs/demo/g2rpo_shapes_flow.yaml"],
    "nft": ["configs/demo/nft_shapes_sd.yaml", "configs/demo/nft_full_shapes_flow.yaml"],
    "awm": ["configs/demo/awm_shapes_flow.yaml"],
    "dro": ["configs/demo/dro_shapes_sd.yaml"],
    "sft": ["configs/demo/sft_shapes_sd.yaml"],
    "find": ["configs/demo/find_shapes_sd.yaml"],
    "ctrl": ["configs/ctrl_shapes_sd.yaml"],
}
START, END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"


def collect(runs: dict[str, Path]) -> list[dict]:
    """One entry per run: its model, guidance, every evaluation (seconds, score, s.e.) and the paired gain."""
    from finetune.demo import finished_run

    entries = []
    for name, run_dir in runs.items():
        r = finished_run(run_dir)
        cfg, last = r["cfg"], r["history"][-1]
        entries.append({
            "run": name, "objective": cfg.objective.name, "model": cfg.model.path,
            "guidance": cfg.eval.get("guidance_scale") or cfg.model.guidance_scale,
            "epochs": last["epoch"], "seconds": last["time"],
            "curve": [{"seconds": h["time"], "overall": h["geneval_overall"], "se": h["geneval_overall_se"]}
                      for h in r["evals"]],
            "gain": r["gain"], "gain_se": r["gain_se"]})
    return entries


def table(entries: list[dict]) -> str:
    lines = ["| objective | model | guidance | epochs | base | after | gain ± paired s.e. |",
             "|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: (e["model"], -e["gain"])):
        base, after = e["curve"][0], e["curve"][-1]
        lines.append(f"| `{e['objective']}` | {e['model']} | {e['guidance']:g} | {e['epochs']} | "
                     f"{base['overall']:.3f} | {after['overall']:.3f} ± {after['se']:.3f} | "
                     f"{e['gain']:+.3f} ± {e['gain_se']:.3f} |")
    return "\n".join(lines)


def readme_table(entries: list[dict]) -> str:
    """The README's objectives table: every objective, its paper and families, and its leaderboard result."""
    from finetune.objectives import OBJECTIVES, objective_class

    by_name: dict[str, list[dict]] = {}
    for e in sorted(entries, key=lambda e: e["model"]):
        by_name.setdefault(e["objective"], []).append(e)
    lines = ["| `objective.name` | paper | families | shapes world: GenEval-shapes, same budget, gain ± paired s.e. |",
             "|---|---|---|---|"]
    for name in OBJECTIVES:
        cls, results = objective_class(name), []
        for e in by_name.get(name, []):
            guidance = "" if e["guidance"] == 1 else f", guidance {e['guidance']:g}"
            results.append(f"`{e['model']}`{guidance}: {e['curve'][0]['overall']:.3f} → "
                           f"{e['curve'][-1]['overall']:.3f}, **{e['gain']:+.3f} ± {e['gain_se']:.3f}**")
        result = "<br>".join(results) or "not on the leaderboard yet"
        lines.append(f"| `{name}` | {cls.paper} | {', '.join(cls.families)} | {result} |")
    return "\n".join(lines)


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({e["model"] for e in entries})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for e in (e for e in entries if e["model"] == model):
            c = e["curve"]
            ax.errorbar([p["seconds"] for p in c], [p["overall"] for p in c], yerr=[p["se"] for p in c],
                        marker="o", capsize=3,
                        label=e["objective"] + ("" if e["guidance"] == 1 else f", guidance {e['guidance']:g}"))
        ax.set(title=model, xlabel="training seconds", ylabel="GenEval-shapes overall (eval split)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(entries: list[dict], out: Path, readme: Path | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.json").write_text(json.dumps(entries, indent=1) + "\n")
    text = table(entries)
    (out / "leaderboard.md").write_text(text + "\n")
    plot(entries, out / "leaderboard.png")
    if readme is not None:
        replace_between_markers(readme, readme_table(entries))
    return text


def replace_between_markers(readme: Path, text: str) -> None:
    page = readme.read_text()
    if START not in page or END not in page:
        raise ValueError(f"{readme} has no {START} ... {END} block to replace")
    head, rest = page.split(START, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def rebuild(leaderboard_json: Path, out: Path, readme: Path | None = None) -> str:
    """The table, the PNG and the README's table again from a saved ``leaderboard.json`` (no runs needed)."""
    return write(json.loads(Path(leaderboard_json).read_text()), out, readme)


def run(objectives: list[str], out: Path, minutes: float, overrides: list[str], readme: Path | None = None,
        parallel: int | None = None, train: bool = True) -> str:
    """Train each objective's recipe (``train=False``: only report the runs already in ``out/runs``)."""
    import os

    from finetune.config import load_config
    from finetune.demo import train_all

    unknown = [o for o in objectives if o not in RECIPES]
    if unknown:
        raise ValueError(f"--objectives: unknown {unknown}; the leaderboard has {', '.join(RECIPES)}")
    recipes = [recipe for o in objectives for recipe in RECIPES[o]]
    if not train:
        runs = {Path(r).stem: out / "runs" / Path(r).stem for r in recipes}
        missing = [str(d) for d in runs.values() if not (d / "history.json").is_file()]
        if missing:
            raise FileNotFoundError(f"no finished run in {', '.join(missing)}; train them first (without --report)")
        return write(collect(runs), out, readme)
    for recipe in recipes:  # bad overrides fail before anything trains
        load_config(recipe, overrides)
    runs = train_all(recipes, out / "runs", minutes, overrides, parallel or min(len(recipes), os.cpu_count() or 1),
                     desc="leaderboard")
    return write(collect(runs), out, readme)
