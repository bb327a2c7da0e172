"""What people look at: per-category tables and sample grids."""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import make_image_grid
from PIL import Image

from eval.layout import iter_images, load_image
from eval.shapes.grammar import TAGS


def category_table(summaries: dict[str, dict]) -> str:
    """A markdown table, one row per run (e.g. model), one column per GenEval task + overall (± its
    image-sampling standard error where the summary has it)."""
    tags = [t for t in TAGS if any(t in s["tasks"] for s in summaries.values())]
    header = "| run | " + " | ".join(tags) + " | overall |"
    lines = [header, "|" + "---|" * (len(tags) + 2)]
    for name, s in summaries.items():
        cells = [f"{s['tasks'][t]['score']:.3f}" if t in s["tasks"] else "-" for t in tags]
        se = f" ± {s['overall_se']:.3f}" if "overall_se" in s else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['overall']:.3f}{se} |")
    return "\n".join(lines)


def folder_grid(images: str | Path, out: str | Path, per_prompt: int = 1, cols: int = 8,
                max_prompts: int = 64) -> Path:
    """A grid of the first ``per_prompt`` samples of up to ``max_prompts`` prompts."""
    picked, seen = [], {}
    for filename, metadata, path in iter_images(images):
        folder = filename.split("/")[0]
        if seen.get(folder, 0) < per_prompt and len(seen) <= max_prompts:
            seen[folder] = seen.get(folder, 0) + 1
            if len(seen) <= max_prompts:
                picked.append(load_image(path))
    rows = -(-len(picked) // cols)
    blank = Image.new("RGB", picked[0].size, (255, 255, 255))
    picked += [blank] * (rows * cols - len(picked))
    grid = make_image_grid(picked, rows=rows, cols=cols)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def category_grids(images: str | Path, rows: list[dict], out: str | Path, per_prompt: int = 4,
                   max_prompts: int = 8, label_width: int = 200) -> list[Path]:
    """One PNG per GenEval task: a row per prompt (its text, then its samples), each sample framed
    green if the rules judged it correct and red if not, so failures are seen at a glance."""
    from PIL import ImageDraw, ImageOps

    correct = {r["filename"]: bool(r["correct"]) for r in rows}
    by_tag: dict[str, dict[str, list]] = {}
    for filename, metadata, path in iter_images(images):
        prompts = by_tag.setdefault(metadata.get("tag", "untagged"), {})
        samples = prompts.setdefault(metadata["prompt"], [])
        if len(samples) < per_prompt:
            samples.append((load_image(path), correct.get(filename)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for tag, prompts in by_tag.items():
        prompts = dict(list(prompts.items())[:max_prompts])
        size = next(iter(prompts.values()))[0][0].size[0] + 8
        sheet = Image.new("RGB", (label_width + per_prompt * size, len(prompts) * size), "white")
        draw = ImageDraw.Draw(sheet)
        for row, (prompt, samples) in enumerate(prompts.items()):
            draw.text((4, row * size + 4), _wrap(prompt, label_width // 6), fill="black")
            for col, (image, ok) in enumerate(samples):
                frame = {True: (0, 160, 0), False: (200, 0, 0), None: (160, 160, 160)}[ok]
                sheet.paste(ImageOps.expand(image, border=4, fill=frame), (label_width + col * size, row * size))
        path = out / f"grid_{tag}.png"
        sheet.save(path)
        written.append(path)
    return written


def comparison_grid(columns: dict[str, str | Path], out: str | Path, per_task: int = 1, samples: int = 3,
                    scale: int = 2) -> Path:
    """Evaluations of the same prompts and seeds side by side: one block of ``samples`` images per
    evaluation folder (``{label: folder}``, each with images/ and results.jsonl; the label on top), one
    row per prompt (``per_task`` of each task, its text written under the row), every sample framed
    green or red by the rules' verdict and enlarged ``scale`` times."""
    import json

    from PIL import ImageDraw, ImageOps

    verdicts = {label: {json.loads(line)["filename"]: bool(json.loads(line)["correct"])
                        for line in (Path(folder) / "results.jsonl").read_text().splitlines() if line.strip()}
                for label, folder in columns.items()}
    first = Path(next(iter(columns.values()))) / "images"
    chosen: dict[str, dict] = {}  # prompt folder -> metadata, per_task of each task in folder order
    for filename, metadata, _ in iter_images(first):
        folder, tag = filename.split("/")[0], metadata.get("tag", "untagged")
        if folder not in chosen and sum(m.get("tag", "untagged") == tag for m in chosen.values()) < per_task:
            chosen[folder] = metadata
    samples = min(samples, len(list((first / next(iter(chosen)) / "samples").glob("*.png"))))
    size, pad, caption, header = 64 * scale + 8, 12, 16, 22
    block = samples * size
    width = len(columns) * (block + pad) - pad
    sheet = Image.new("RGB", (width, header + len(chosen) * (size + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(columns):
        draw.text((c * (block + pad) + 4, 4), label, fill="black")
    for r, (folder, metadata) in enumerate(chosen.items()):
        top = header + r * (size + caption)
        for c, (label, root) in enumerate(columns.items()):
            for j in range(samples):
                name = f"{folder}/samples/{j:04d}.png"
                image = load_image(Path(root) / "images" / name)
                image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
                frame = {True: (0, 160, 0), False: (200, 0, 0), None: (160, 160, 160)}[verdicts[label].get(name)]
                sheet.paste(ImageOps.expand(image, border=4, fill=frame), (c * (block + pad) + j * size, top))
        draw.text((4, top + size + 1), f"{metadata.get('tag', '')}: {metadata['prompt']}", fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
