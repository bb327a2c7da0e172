"""CTRL's measurement: does the added size condition control the size the rule detector measures?

For each size class y, every eval prompt is sampled with condition y (the same seeds for every
class) and the detector's size class of each image is compared with y (``eval.shapes.size``, not the
classifier CTRL trained against). The base model has no condition: its row is how often its own
samples happen to fall in each class (chance is ~1/3). With ``--geneval`` the run's GenEval-shapes
score with the condition set to null is measured too (16 images per prompt by default). Writes
OUT/bench_condition.{json,md} and OUT/bench_condition_grid.png.

    python launch/bench_condition.py --model shapes-sd --lora runs/ctrl/lora --out docs/ctrl_bench
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image

from eval.generate import generate
from eval.layout import iter_images
from eval.run import geneval_model, load_records
from eval.shapes.detector import ShapesDetector
from eval.shapes.render import SIZE_CLASSES
from eval.shapes.size import measured_size_class
from finetune.models.hub import load_pipeline


def count_objects(record: dict) -> int:
    return sum(clause["count"] for clause in record["include"])


def size_match(model: str, lora: str | None, records: list[dict], out: Path, images_per_prompt: int,
               guidance: float) -> dict:
    """{class: {match, se, n, measured: {class: fraction}}} for samples asked for each class."""
    detector, results = ShapesDetector(), {}
    for size in SIZE_CLASSES:
        pipe = load_pipeline(model, lora=lora, condition=size if lora else None)
        folder = out / (f"size-{size}" if lora else "base")
        if lora or not folder.exists():
            generate(pipe, records, folder, images_per_prompt, seed=0, guidance_scale=guidance)
        measured = [measured_size_class(detector, Image.open(path).convert("RGB"), count_objects(meta))
                    for _, meta, path in iter_images(folder)]
        hits = [m == size for m in measured]
        p = sum(hits) / len(hits)
        results[size] = {"match": p, "se": math.sqrt(p * (1 - p) / len(hits)), "n": len(hits),
                         "measured": {c or "none found": measured.count(c) / len(measured)
                                      for c in (*SIZE_CLASSES, None)}}
    return results


def grid(samples: Path, records: list[dict], path: Path) -> None:
    """One eval prompt per task (rows, prompt written on the left); the base's sample, then the samples
    asked for each size class, all from the same seed's noise."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts = {}
    for i, record in enumerate(records):
        firsts.setdefault(record["tag"], i)
    columns = [("base", samples / "base")] + [(f"CTRL: {c}", samples / f"size-{c}") for c in SIZE_CLASSES]
    fig, axes = plt.subplots(len(firsts), len(columns), figsize=(1.6 * len(columns) + 1.6, 1.6 * len(firsts)),
                             squeeze=False)
    for row, (tag, i) in enumerate(firsts.items()):
        for col, (title, folder) in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(Image.open(folder / f"{i:05d}" / "samples" / "0000.png"))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row][0].set_ylabel(textwrap.fill(records[i]["prompt"].removeprefix("a photo of "), 16), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-sd")
    ap.add_argument("--lora", required=True, help="a CTRL run's output_dir/lora")
    ap.add_argument("--prompts", default="shapes:eval")
    ap.add_argument("--images-per-prompt", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--geneval", action="store_true", help="also GenEval-shapes with the condition null")
    ap.add_argument("--geneval-images", type=int, default=16)
    ap.add_argument("--out", default="runs/bench_condition")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out = Path(args.out)
    records = load_records(args.prompts)
    report = {"base": size_match(args.model, None, records, out / "samples", args.images_per_prompt, args.guidance),
              "ctrl": size_match(args.model, args.lora, records, out / "samples", args.images_per_prompt,
                                 args.guidance)}
    if args.geneval:
        for name, lora in (("base", None), ("ctrl_null", args.lora)):
            summary = geneval_model(args.model, out / f"geneval-{name}", lora, args.prompts,
                                    images_per_prompt=args.geneval_images, guidance=args.guidance)
            report[f"geneval_{name}"] = {"overall": summary["overall"], "se": summary["overall_se"]}
    lines = ["| asked for | base: measured as asked | CTRL: measured as asked |", "|---|---|---|"]
    for size in SIZE_CLASSES:
        b, c = report["base"][size], report["ctrl"][size]
        lines.append(f"| {size} | {b['match']:.3f} ± {b['se']:.3f} | {c['match']:.3f} ± {c['se']:.3f} |")
    for key in ("geneval_base", "geneval_ctrl_null"):
        if key in report:
            lines.append(f"\n{key}: {report[key]['overall']:.3f} ± {report[key]['se']:.3f}")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    grid(out / "samples", records, out / "bench_condition_grid.png")
    (out / "bench_condition.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench_condition.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
