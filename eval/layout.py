"""GenEval's image folder layout: ``DIR/00000/metadata.jsonl`` + ``DIR/00000/samples/0000.png``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image


def prompt_dir(root: str | Path, index: int) -> Path:
    return Path(root) / f"{index:05d}"


def write_prompt(root: str | Path, index: int, metadata: dict, images: list[Image.Image]) -> None:
    """Write one prompt's metadata and samples (numbered from 0000)."""
    folder = prompt_dir(root, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    for j, image in enumerate(images):
        image.save(folder / "samples" / f"{j:04d}.png")


def iter_images(root: str | Path, prompt_indices: list[int] | None = None) -> Iterator[tuple[str, dict, Path]]:
    """Yield (filename relative to root, metadata, path) for every sample, in folder order.

    ``prompt_indices`` limits it to those prompt folders (a process's shard).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if prompt_indices is not None:
        folders = [prompt_dir(root, i) for i in prompt_indices]
    if not folders:
        raise ValueError(f"{root} is not in GenEval's layout: expected numbered prompt folders "
                         "(00000/metadata.jsonl, 00000/samples/0000.png, ...)")
    for folder in folders:
        meta_file = folder / "metadata.jsonl"
        if not meta_file.exists():
            raise ValueError(f"{folder} has no metadata.jsonl (GenEval layout: {folder.name}/metadata.jsonl)")
        try:
            metadata = json.loads(meta_file.read_text().splitlines()[0])
        except (json.JSONDecodeError, IndexError) as err:
            raise ValueError(f"{meta_file}:1: not a JSON metadata line ({err})") from None
        samples = sorted((folder / "samples").glob("*.png"))
        if not samples:
            raise ValueError(f"{folder} has no samples/*.png images")
        for path in samples:
            yield str(path.relative_to(root)), metadata, path


def load_image(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")
