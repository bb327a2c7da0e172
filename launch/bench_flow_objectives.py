"""Head-to-head on shapes-flow: Flow-GRPO, AWM, DiffusionNFT, LOOP and G²RPO from the same base
model, on the same prompt sequence, each for the same wall-clock training budget on this machine.

    python launch/bench_flow_objectives.py --minutes 15 --eval-every-minutes 3

Every run is evaluated with one protocol (GenEval-shapes, eval split, 4 images per prompt, 20-step
ODE sampler, guidance ``--eval-guidance``) whenever its training time passes a multiple of
``--eval-every-minutes``; evaluation time is not counted. Writes ``OUT/<recipe>/`` (the runs),
``OUT/bench.png`` (score vs training seconds) and ``OUT/bench.md`` (final scores and the time each
needs to reach Flow-GRPO's final score).

Recipes can run side by side, one process per core (``--recipes`` one each, separate ``--out``);
``--merge DIR ...`` then combines their ``curves.json`` into one table and plot in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RECIPES = ["configs/demo/flow_grpo_shapes_flow.yaml", "configs/demo/awm_shapes_flow.yaml",
           "configs/demo/nft_shapes_flow.yaml", "configs/demo/loop_shapes_flow.yaml", "configs/demo/g2rpo_shapes_flow.yaml"]


def time_to_reach(evals: list[dict], target: float) -> float | None:
    return next((h["time"] for h in evals if h["geneval_overall"] >= target - 1e-9), None)


def table(curves: dict[str, list[dict]]) -> str:
    reference = curves.get("flow_grpo")
    target = reference[-1]["geneval_overall"] if reference else None
    if reference and target <= reference[0]["geneval_overall"]:
        target = None  # Flow-GRPO did not improve on the base: "time to reach it" would be 0 for everyone
    ref_time = time_to_reach(reference, target) if target is not None else None
    lines = ["| objective | base | final | epochs | training s | s to reach Flow-GRPO's final | vs Flow-GRPO |",
             "|---|---|---|---|---|---|---|"]
    for name, evals in curves.items():
        reach = time_to_reach(evals, target) if target is not None else None
        ratio = f"{reach / ref_time:.2f}x" if reach is not None and ref_time else "-"
        lines.append(f"| {name} | {evals[0]['geneval_overall']:.3f} | {evals[-1]['geneval_overall']:.3f} | "
                     f"{evals[-1]['epoch']} | {evals[-1]['time']:.0f} | "
                     f"{'n/a' if target is None else 'not reached' if reach is None else f'{reach:.0f}'} | {ratio} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, evals in curves.items():
        # Error bars: the overall score's standard error over eval images (differences below ~2 s.e. are noise).
        ax.errorbar([h["time"] for h in evals], [h["geneval_overall"] for h in evals],
                    yerr=[h.get("geneval_overall_se", 0.0) for h in evals], marker="o", capsize=3, label=name)
    ax.set(xlabel="training wall-clock seconds (evaluation excluded)", ylabel="GenEval-shapes overall",
           title="shapes-flow: objectives at equal CPU budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    from finetune.config import load_config
    from finetune.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per objective")
    ap.add_argument("--eval-every-minutes", type=float, default=3.0)
    ap.add_argument("--eval-guidance", type=float, default=4.0)
    ap.add_argument("--images-per-prompt", type=int, default=16,
                    help="per eval prompt; at 4 the overall score's sampling error is ~0.03 on the shapes split")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="combine the curves.json of earlier runs; train nothing")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every recipe")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge:
        curves = {}
        for run in args.merge:
            path = Path(run) / "curves.json"
            if not path.is_file():
                raise SystemExit(f"--merge {run}: no curves.json there; run the bench with --out {run} first")
            curves.update(json.loads(path.read_text()))
        curves = dict(sorted(curves.items(), key=lambda kv: kv[0] != "flow_grpo"))  # the reference first
        report(curves, out)
        return

    # `--recipes a.yaml b.yaml key=value` would otherwise swallow the overrides as recipe names.
    recipes = [r for r in args.recipes if "=" not in r]
    overrides = [r for r in args.recipes if "=" in r] + args.overrides
    curves = {}
    for recipe in recipes:
        run_dir = out / Path(recipe).stem
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(recipe, [f"output_dir={run_dir}", f"train.max_minutes={args.minutes}", "train.epochs=100000",
                                   "eval.every=1", f"eval.every_minutes={args.eval_every_minutes}",
                                   f"eval.guidance_scale={args.eval_guidance}",
                                   f"eval.images_per_prompt={args.images_per_prompt}", *overrides])
        history = Trainer(cfg).train()
        curves[cfg.objective.name] = [h for h in history if "geneval_overall" in h]
        (out / "curves.json").write_text(json.dumps(curves, indent=1) + "\n")  # partial results survive a crash
    report(curves, out)


def report(curves: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    plot(curves, out / "bench.png")
    text = table(curves)
    (out / "bench.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
