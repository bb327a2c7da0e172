"""Prompt grammar of the shapes world, worded exactly like GenEval's prompts.

Every prompt is a GenEval metadata record: ``{"tag", "include", ["exclude"], "prompt"}`` where
``include``/``exclude`` hold ``{"class", "count", ["color"], ["position": [relation, group]]}``.
The six tags mirror GenEval's task categories; train and eval splits are disjoint and seeded.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

CLASSES = ("circle", "square", "triangle", "star")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

# Prompts per tag that go to the eval split; the rest of each tag is the train split.
EVAL_PROMPTS_PER_TAG = {
    "single_object": 2, "two_object": 4, "counting": 4, "colors": 12, "position": 16, "color_attr": 24,
}
DEFAULT_SEED = 2023


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _record(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    record = {"tag": tag, "include": include}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = prompt
    return record


def all_prompts() -> dict[str, list[dict]]:
    """Every prompt of the grammar, grouped by tag, in a fixed order."""
    pairs = list(itertools.permutations(CLASSES, 2))
    out = {tag: [] for tag in TAGS}
    for cls in CLASSES:
        out["single_object"].append(
            _record("single_object", [{"class": cls, "count": 1}], "a photo of " + with_article(cls)))
    for a, b in pairs:
        out["two_object"].append(_record(
            "two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}],
            f"a photo of {with_article(a)} and {with_article(b)}"))
    for cls in CLASSES:
        for n in (2, 3, 4):
            out["counting"].append(_record(
                "counting", [{"class": cls, "count": n}], f"a photo of {NUMBERS[n]} {PLURALS[cls]}",
                exclude=[{"class": cls, "count": n + 1}]))
    for cls in CLASSES:
        for color in COLORS:
            out["colors"].append(_record(
                "colors", [{"class": cls, "count": 1, "color": color}],
                f"a photo of {with_article(color + ' ' + cls)}"))
    for a, b in pairs:
        for rel in RELATIONS:
            # GenEval: "a photo of a A right of a B" -> A holds `rel` to group 0 (the B).
            out["position"].append(_record(
                "position",
                [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                f"a photo of {with_article(a)} {rel} {with_article(b)}"))
    for a, b in pairs:
        for ca, cb in itertools.permutations(COLORS, 2):
            out["color_attr"].append(_record(
                "color_attr",
                [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                f"a photo of {with_article(ca + ' ' + a)} and {with_article(cb + ' ' + b)}"))
    return out


def split(name: str, seed: int = DEFAULT_SEED) -> list[dict]:
    """The ``train`` or ``eval`` split: a seeded, disjoint partition of each tag's prompts."""
    if name not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {name!r}")
    rng = random.Random(seed)
    records = []
    for tag, prompts in all_prompts().items():
        order = list(range(len(prompts)))
        rng.shuffle(order)
        n_eval = EVAL_PROMPTS_PER_TAG[tag]
        chosen = sorted(order[:n_eval]) if name == "eval" else sorted(order[n_eval:])
        records.extend(prompts[i] for i in chosen)
    return records


def write_jsonl(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read GenEval-style metadata; a malformed line is reported with its line number."""
    records = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        for key in ("tag", "include", "prompt"):
            if key not in record:
                raise ValueError(f"{path}:{lineno}: metadata record lacks the field {key!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts in this metadata file")
    return records
