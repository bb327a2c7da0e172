"""Renderer of the shapes world: a metadata record -> a 64x64 ground-truth image.

The scene holds exactly the objects the record includes (so ``exclude`` is never violated), with
random sizes, places and unspecified colours. Shapes are drawn 4x larger and downsampled, so edges are
anti-aliased like a generated image's rather than hard pixel staircases.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from eval.geneval import relative_position

SIZE = 64
SUPERSAMPLE = 4
BACKGROUND = (150, 150, 150)  # mid grey: black and white both stand out, as do the eight hues
PALETTE = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 230, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "purple": (130, 40, 180),
    "pink": (250, 130, 200),
    "brown": (110, 60, 20),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
# Half-extent (pixels) range of an object, by how many objects share the canvas.
RADIUS_RANGE = {1: (9, 15), 2: (7, 11), 3: (6, 9), 4: (6, 8)}
MARGIN = 3  # free pixels kept between two objects and between an object and the border
# Object size, a condition no prompt expresses (CTRL): which third of its radius range an object's
# half-extent lies in.
SIZE_CLASSES = ("small", "medium", "large")


def radius_range(n_objects: int, size_class: str | None = None) -> tuple[float, float]:
    """Half-extent range for a scene of ``n_objects``; with ``size_class``, that class's third of it."""
    lo, hi = RADIUS_RANGE[min(n_objects, 4)]
    if size_class is None:
        return lo, hi
    k, third = SIZE_CLASSES.index(size_class), (hi - lo) / 3
    return lo + k * third, lo + (k + 1) * third


def size_class_of(radius: float, n_objects: int) -> str:
    """The size class of a half-extent (pixels of the 64-pixel canvas) in a scene of ``n_objects``."""
    lo, hi = RADIUS_RANGE[min(n_objects, 4)]
    k = int((radius - lo) / ((hi - lo) / 3))
    return SIZE_CLASSES[min(max(k, 0), len(SIZE_CLASSES) - 1)]


@dataclass
class Placed:
    cls: str
    color: str
    cx: float
    cy: float
    r: float

    @property
    def box(self) -> list[float]:
        return [self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r]


def shape_polygon(cls: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of an upright polygon shape; ``None`` for the circle."""
    if cls == "circle":
        return None
    if cls == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if cls == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if cls == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) + 0.1 * r))
        return points
    raise ValueError(f"unknown shape class {cls!r}")


def draw(objects: list[Placed], size: int = SIZE) -> Image.Image:
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    for obj in objects:
        fill = PALETTE[obj.color]
        poly = shape_polygon(obj.cls, obj.cx * s, obj.cy * s, obj.r * s)
        if poly is None:
            pen.ellipse([v * s for v in obj.box], fill=fill)
        else:
            pen.polygon(poly, fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _wanted(record: dict, rng: random.Random) -> list[tuple[str, str, list | None]]:
    """(class, colour, position) for every object the record asks for, colours filled in."""
    wanted = []
    for clause in record["include"]:
        for _ in range(clause["count"]):
            color = clause.get("color") or rng.choice(list(PALETTE))
            wanted.append((clause["class"], color, clause.get("position")))
    return wanted


def layout(record: dict, rng: random.Random, size: int = SIZE, tries: int = 2000,
           size_class: str | None = None) -> list[Placed]:
    """Random non-overlapping placement satisfying every include clause (position included); with
    ``size_class``, every object's half-extent lies in that class's third of the radius range."""
    wanted = _wanted(record, rng)
    lo, hi = radius_range(len(wanted), size_class)
    for _ in range(tries):
        placed: list[Placed] = []
        for cls, color, _pos in wanted:
            r = rng.uniform(lo, hi)
            cx = rng.uniform(r + MARGIN, size - r - MARGIN)
            cy = rng.uniform(r + MARGIN, size - r - MARGIN)
            if any(math.hypot(cx - p.cx, cy - p.cy) < (r + p.r) * 1.42 + MARGIN for p in placed):
                break
            placed.append(Placed(cls, color, cx, cy, r))
        else:
            if _positions_hold(record, placed):
                return placed
    raise RuntimeError(f"could not lay out {record['prompt']!r} in {tries} tries")


def _positions_hold(record: dict, placed: list[Placed]) -> bool:
    # Objects appear in include order, so each clause's objects are a contiguous run.
    groups, start = [], 0
    for clause in record["include"]:
        groups.append(placed[start:start + clause["count"]])
        start += clause["count"]
    for clause, group in zip(record["include"], groups):
        if "position" not in clause:
            continue
        relation, target = clause["position"]
        for obj in group:
            for other in groups[target]:
                # Demand the relation with room to spare, so blur cannot flip a ground truth.
                if relation not in relative_position(obj.box, other.box, margin=0.25):
                    return False
    return True


def render(record: dict, seed: int, size_class: str | None = None) -> tuple[Image.Image, list[Placed]]:
    """Render one ground-truth image for ``record``; the same seed gives the same image."""
    rng = random.Random(seed)
    objects = layout(record, rng, size_class=size_class)
    return draw(objects), objects
