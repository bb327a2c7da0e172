"""GenEval's image folder layout: ``DIR/00000/metadata.jsonl`` + ``DIR/00000/samples/0000.png``.

Bad input is an error that starts with the offending path and says how to fix it (a ``ValueError``,
or a ``FileNotFoundError`` for something missing); nothing is skipped or guessed silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

EXAMPLE_METADATA = '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}'
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def prompt_dir(root: str | Path, index: int) -> Path:
    return Path(root) / f"{index:05d}"


def write_prompt(root: str | Path, index: int, metadata: dict, images: list[Image.Image]) -> None:
    """Write one prompt's metadata and samples (numbered from 0000)."""
    folder = prompt_dir(root, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    for j, image in enumerate(images):
        image.save(folder / "samples" / f"{j:04d}.png")


def write_sample(root: str | Path, index: int, image_index: int, metadata: dict, image: Image.Image) -> None:
    """Write one sample of a prompt (and, with its first sample, the prompt's metadata): processes that
    share a prompt's samples each write their own files."""
    folder = prompt_dir(root, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    if image_index == 0:
        (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    image.save(folder / "samples" / f"{image_index:04d}.png")


def require_prompt(metadata: dict, meta_file: Path) -> None:
    """The layout's own check: every consumer reads ``metadata["prompt"]``."""
    if not isinstance(metadata.get("prompt"), str):
        found = "lacks" if "prompt" not in metadata else f"has a non-string {_json_type(metadata['prompt'])}"
        raise ValueError(f"{meta_file}: metadata {found} \"prompt\" (the prompt text the images were "
                         f"generated from); write it as e.g. {EXAMPLE_METADATA}")


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_metadata(meta_file: str | Path) -> dict:
    """The one JSON object of a prompt folder's metadata.jsonl.

    Like GenEval's ``json.load``, the object may span several lines; anything else in the file
    (a second line, a non-object) is an error naming ``file:line``.
    """
    meta_file = Path(meta_file)
    folder = meta_file.parent
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: missing; each numbered prompt folder of GenEval's layout needs "
                                f"one ({folder.name}/metadata.jsonl holding the prompt's metadata, beside "
                                f"{folder.name}/samples/): add it, or move {folder} out of the images folder")
    try:
        text = meta_file.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as err:
        raise ValueError(f"{meta_file}: not UTF-8 text ({err}); it must hold one JSON object, "
                         f"e.g. {EXAMPLE_METADATA}") from None
    if not text.strip():
        raise ValueError(f"{meta_file}: empty; it must hold the prompt's metadata as one JSON object, "
                         f"e.g. {EXAMPLE_METADATA}")
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    line = text.count("\n", 0, start) + 1
    try:
        value, end = decoder.raw_decode(text, start)
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}); the file "
                         f"must hold one JSON object, e.g. {EXAMPLE_METADATA}") from None
    if not isinstance(value, dict):
        shown = text[start:end] if end - start <= 60 else text[start:start + 57] + "..."
        raise ValueError(f"{meta_file}:{line}: a JSON {_json_type(value)} ({shown}), not an object; the metadata "
                         f"must be one JSON object, e.g. {EXAMPLE_METADATA}")
    rest = text[end:]
    if rest.strip():
        extra = end + len(rest) - len(rest.lstrip())
        raise ValueError(f"{meta_file}:{text.count(chr(10), 0, extra) + 1}: more data after the metadata object; "
                         "GenEval's layout has exactly one JSON object per metadata.jsonl (one prompt per "
                         "folder): give each prompt its own numbered folder")
    return value


def iter_images(root: str | Path, prompt_indices: list[int] | None = None,
                check: Callable[[dict, Path], None] = require_prompt) -> Iterator[tuple[str, dict, Path]]:
    """Yield (filename relative to root, metadata, path) for every sample, in folder order.

    ``prompt_indices`` limits it to those prompt folders (a process's shard). ``check(metadata,
    metadata_file)`` validates each folder's metadata (by default: it has a ``prompt``).
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
        metadata = read_metadata(meta_file)
        check(metadata, meta_file)
        samples_dir = folder / "samples"
        if not samples_dir.is_dir():
            raise FileNotFoundError(f"{samples_dir}: missing; GenEval's layout keeps each prompt's images in "
                                    f"{folder.name}/samples/0000.png, 0001.png, ...: generate the images for "
                                    f"{folder} again, or move the folder out of {root}")
        samples = sorted(samples_dir.glob("*.png"))
        if not samples:
            others = sorted(p.name for p in samples_dir.iterdir())
            held = (f"it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} but no .png"
                    if others else "it is empty")
            raise ValueError(f"{samples_dir}: no .png images ({held}); GenEval's layout keeps each prompt's "
                             f"images there as 0000.png, 0001.png, ...: generate the images for {folder} "
                             f"again, or move the folder out of {root}")
        for path in samples:
            yield str(path.relative_to(root)), metadata, path


def _unreadable(path: Path, err: BaseException) -> ValueError:
    reason = "not an image format PIL recognises" if isinstance(err, Image.UnidentifiedImageError) else str(err)
    return ValueError(f"{path}: cannot be read as an image ({reason}); the file is corrupt or not an image: "
                      "generate it again, or delete it")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(path, err) from None


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(path, err) from None


def describe_sizes(sizes: dict[Path, tuple[int, int]], max_paths: int = 3) -> str:
    """"64x64 (3 files), 128x128 (1 file: b.png)": each size with its count, the paths of all but the
    most common size (up to ``max_paths`` each)."""
    groups: dict[tuple[int, int], list[Path]] = {}
    for path, size in sizes.items():
        groups.setdefault(size, []).append(path)
    common = max(groups, key=lambda s: len(groups[s]))
    parts = []
    for (w, h), paths in groups.items():
        n = f"{len(paths)} file{'s' if len(paths) != 1 else ''}"
        if (w, h) != common:
            shown = ", ".join(str(p) for p in paths[:max_paths])
            n += f": {shown}" + (f", ... ({len(paths) - max_paths} more)" if len(paths) > max_paths else "")
        parts.append(f"{w}x{h} ({n})")
    return ", ".join(parts)
