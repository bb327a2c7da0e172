"""Learning from demonstrations vs RL: combine finished runs into one table, curve plot and sample grid.

Each run is a ``diffrl train`` output folder (history.json and eval/epoch-*/ with 16 images per eval
prompt), named on the command line as MODEL/LABEL=DIR; DIR may also be an OUT.json this script wrote
earlier, whose MODEL/LABEL curve is reused (it has no images for the grid). The base score of a model is the epoch-0
evaluation of whichever of its runs has one (``eval.at_start``; same seeds, so the same for all).

    python launch/bench_demonstrations.py --out docs/demonstrations \\
        shapes-sd/dro=runs/h2h/dro_sd shapes-sd/sft=runs/h2h/sft_sd shapes-sd/ddpo=runs/h2h/ddpo_sd ...

Writes OUT.md (per-category tables), OUT.json (the curves) and OUT.png (GenEval-shapes against training
seconds with standard errors), and OUT_grid.png (one eval prompt per task; base, then each run's
final sample with the same seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def evaluations(run: Path) -> list[dict]:
    """Each evaluation of a run: epoch, training seconds, overall score, its s.e., per-task scores."""
    history = {h["epoch"]: h for h in json.loads((run / "history.json").read_text())}
    rows = []
    for folder in sorted((run / "eval").glob("epoch-*")):
        summary = json.loads((folder / "results_summary.json").read_text())
        epoch = int(folder.name.split("-")[1])
        rows.append({"epoch": epoch, "time": history.get(epoch, {}).get("time", 0.0), "dir": str(folder),
                     "overall": summary["overall"], "se": summary["overall_se"],
                     "tasks": {k: v["score"] for k, v in summary["tasks"].items()}})
    return rows


def collect(specs: list[str]) -> dict[str, dict[str, list[dict]]]:
    runs: dict[str, dict[str, list[dict]]] = {}
    for spec in specs:
        name, _, folder = spec.partition("=")
        model, _, label = name.partition("/")
        if not folder or not label:
            raise SystemExit(f"{spec!r}: write MODEL/LABEL=DIR, e.g. shapes-sd/dro=runs/h2h/dro_sd")
        if folder.endswith(".json"):  # curves written earlier by this script (no images: left out of the grid)
            runs.setdefault(model, {})[label] = json.loads(Path(folder).read_text())[model][label]
        else:
            runs.setdefault(model, {})[label] = evaluations(Path(folder))
    for model, by_label in runs.items():
        base = next((r[0] for r in by_label.values() if r and r[0]["epoch"] == 0), None)
        if base is None:
            raise SystemExit(f"no run of {model} has an epoch-0 evaluation (eval.at_start)")
        for label, rows in by_label.items():
            if not rows or rows[0]["epoch"] != 0:
                rows.insert(0, base)
    return runs


def table(runs: dict[str, dict[str, list[dict]]]) -> str:
    lines = []
    for model, by_label in runs.items():
        base = next(iter(by_label.values()))[0]
        lines += [f"### `{model}`", "", "| run | epochs | " + " | ".join(TASKS) + " | overall (each evaluation) | gain |",
                  "|---|---|" + "---|" * len(TASKS) + "---|---|",
                  f"| base | - | " + " | ".join(f"{base['tasks'][t]:.2f}" for t in TASKS) + f" | {base['overall']:.3f} ± {base['se']:.3f} | - |"]
        for label, rows in by_label.items():
            last = rows[-1]
            path = " → ".join(f"{r['overall']:.3f}" for r in rows)
            lines.append(f"| {label} | {last['epoch']} | " + " | ".join(f"{last['tasks'][t]:.2f}" for t in TASKS)
                         + f" | {path} ± {last['se']:.3f} | {last['overall'] - base['overall']:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (model, by_label) in zip(axes[0], runs.items()):
        for label, rows in by_label.items():
            ax.errorbar([r["time"] for r in rows], [r["overall"] for r in rows], yerr=[r["se"] for r in rows],
                        marker="o", capsize=3, label=label)
        ax.set(xlabel="training seconds, one core (evaluation excluded)", ylabel="GenEval-shapes overall",
               title=f"{model}, CFG-free")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grid(runs: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """Per model: columns are one eval prompt per task (the prompt written above), rows the base and
    each run's final evaluation; every cell is the same seed's first image."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    blocks = []
    for model, by_label in runs.items():
        by_label = {label: rows for label, rows in by_label.items() if "dir" in rows[-1]}
        bases = [rows[0]["dir"] for rows in by_label.values() if "dir" in rows[0]]
        if not bases:
            print(f"{model}: no run folder with a base evaluation (eval.at_start): left out of the grid")
            continue
        base_dir = Path(bases[0]) / "images"
        records = {json.loads((f / "metadata.jsonl").read_text().splitlines()[0])["tag"]: f
                   for f in sorted(base_dir.iterdir(), reverse=True)}  # first prompt of each task wins
        prompts = [records[t] for t in TASKS if t in records]
        rows = [("base", base_dir)] + [(label, Path(r[-1]["dir"]) / "images") for label, r in by_label.items()]
        blocks.append((model, prompts, rows))
    if not blocks:
        return
    n_rows, n_cols = sum(len(b[2]) for b in blocks), max(len(b[1]) for b in blocks)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.5 * n_cols + 0.8, 1.75 * n_rows), squeeze=False)
    i = 0
    for model, prompts, rows in blocks:
        for r, (label, folder) in enumerate(rows):
            for j, ax in enumerate(axes[i]):
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(prompts):
                    ax.axis("off")
                    continue
                ax.imshow(Image.open(folder / prompts[j].name / "samples" / "0000.png"))
                if r == 0:
                    prompt = json.loads((prompts[j] / "metadata.jsonl").read_text().splitlines()[0])["prompt"]
                    ax.set_title(textwrap.fill(prompt.removeprefix("a photo of "), 18), fontsize=7)
            axes[i][0].set_ylabel(f"{model}\n{label}" if r == 0 else label, fontsize=8)
            i += 1
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/demonstrations")
    ap.add_argument("runs", nargs="+", help="MODEL/LABEL=DIR")
    args = ap.parse_args()
    runs, out = collect(args.runs), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    Path(f"{out}.md").write_text(text + "\n")
    Path(f"{out}.json").write_text(json.dumps({m: {k: [{x: r[x] for x in ("epoch", "time", "overall", "se", "tasks")}
                                                          for r in v] for k, v in b.items()} for m, b in runs.items()},
                                              indent=1) + "\n")
    plot(runs, Path(f"{out}.png"))
    grid(runs, Path(f"{out}_grid.png"))
    print(text)


if __name__ == "__main__":
    main()
