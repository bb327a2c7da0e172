"""Rule-based detector of the shapes world: image -> per-class detections with box, mask, colour.

Made for generated images, not only clean renders:
1. foreground = pixels far from the background grey; connected components of it are candidates;
2. a component whose *core* (eroded) pixels hold two or more palette colours in force is split by
   colour, every pixel going to the nearest core region (blurred fringes are not objects);
3. the colour is the palette colour nearest to the median core pixel (tolerates drift);
4. the class comes from four shape features (bbox fill, convex solidity, aspect, vertical centroid)
   against prototypes measured on renders; the confidence is the class posterior times how typical
   the object is of that class, so smeared blobs fall below GenEval's 0.9 counting threshold.
"""

from __future__ import annotations

import functools
import random
import sys

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from eval.geneval import Detection
from eval.shapes.grammar import CLASSES, COLORS
from eval.shapes.render import BACKGROUND, PALETTE, SIZE, Placed, draw

FOREGROUND_DISTANCE = 48.0  # RGB distance from the background that counts as paint
MIN_AREA = 12  # pixels (at 64x64) below which a component is noise
MIN_COLOR_SHARE = 0.2  # share of a component's core that a second colour needs to split it off
PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


def shape_features(mask: np.ndarray) -> np.ndarray:
    """[bbox fill, convex solidity, aspect w/h, centroid height within bbox] of a binary mask."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    w = xs.max() - xs.min() + 1.0
    h = ys.max() - ys.min() + 1.0
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull_area = ConvexHull(corners).volume
    except QhullError:
        hull_area = w * h
    return np.array([area / (w * h), area / hull_area, w / h, (ys.mean() - ys.min() + 0.5) / h])


@functools.lru_cache(maxsize=1)
def prototypes() -> tuple[np.ndarray, np.ndarray]:
    """Per-class feature mean and spread, measured on renders of every size the world uses."""
    rng = random.Random(0)
    means, spreads = [], []
    for cls in CLASSES:
        feats = []
        for _ in range(200):
            r = rng.uniform(6, 15)
            obj = Placed(cls, rng.choice(COLORS), rng.uniform(20, 44), rng.uniform(20, 44), r)
            fg = _foreground(np.asarray(draw([obj]), dtype=np.float32))
            feats.append(shape_features(fg))
        feats = np.array(feats)
        means.append(feats.mean(0))
        # A floor keeps the classifier from trusting sub-pixel precision that generated images lack.
        spreads.append(np.maximum(feats.std(0), [0.04, 0.04, 0.06, 0.03]))
    return np.array(means), np.array(spreads)


def _foreground(rgb: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rgb - np.array(BACKGROUND, np.float32), axis=-1) > FOREGROUND_DISTANCE


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Index into COLORS of the palette colour nearest to each RGB row."""
    return np.argmin(((rgb[..., None, :] - PALETTE_RGB) ** 2).sum(-1), axis=-1)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(class, confidence) of one object mask."""
    mu, sd = prototypes()
    z2 = (((shape_features(mask) - mu) / sd) ** 2).sum(1)  # squared normalised distance per class
    posterior = np.exp(-0.5 * (z2 - z2.min()))
    posterior /= posterior.sum()
    best = int(np.argmin(z2))
    # Typicality: 1 within ~3 spreads in all four features, decaying beyond.
    typicality = float(np.exp(-0.5 * max(0.0, np.sqrt(z2[best]) - 3.0) ** 2))
    return CLASSES[best], float(posterior[best]) * typicality


def _split_by_color(component: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    core = ndimage.binary_erosion(component)
    if core.sum() < MIN_AREA // 2:
        return [component]
    counts = np.bincount(labels[core], minlength=len(COLORS))
    major = [c for c in range(len(COLORS)) if counts[c] >= max(MIN_AREA // 2, MIN_COLOR_SHARE * core.sum())]
    if len(major) < 2:
        return [component]
    seeds = np.zeros(component.shape, dtype=np.int32)
    n_seeds = 0
    for c in major:
        regions, n = ndimage.label(core & (labels == c))
        for k in range(1, n + 1):
            if (regions == k).sum() >= MIN_AREA // 2:
                n_seeds += 1
                seeds[regions == k] = n_seeds
    if n_seeds < 2:
        return [component]
    # Every pixel of the component joins its nearest seed region.
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]
    return [component & (owner == k) for k in range(1, n_seeds + 1)]


class ShapesDetector:
    """GenEval detector backend for the shapes world (``--backend shapes``)."""

    name = "shapes"
    classnames = CLASSES
    image_size = SIZE  # it detects at 64x64: square images of other sizes are resized, others refused

    def __init__(self):
        self.noted_sizes: set[tuple[int, int]] = set()  # sizes whose resizing has been announced

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        image = image.convert("RGB")
        scale = 1.0
        width, height = image.size
        if width != height:
            raise ValueError(f"a {width}x{height} image: the shapes detector works on {SIZE}x{SIZE} images and will "
                             f"not squash a non-square one; crop or resize the images to square first")
        if image.size != (SIZE, SIZE):
            if image.size not in self.noted_sizes:
                self.noted_sizes.add(image.size)
                print(f"note: resizing {width}x{height} images to {SIZE}x{SIZE} for the shapes detector, which works "
                      f"at {SIZE}x{SIZE} (box filter; boxes stay in the images' own pixels)", file=sys.stderr)
            scale = width / SIZE
            image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
        rgb = np.asarray(image, dtype=np.float32)
        labels = nearest_color(rgb)
        components, n = ndimage.label(_foreground(rgb))
        found: dict[str, list[Detection]] = {}
        for k in range(1, n + 1):
            component = components == k
            if component.sum() < MIN_AREA:
                continue
            for mask in _split_by_color(component, labels):
                if mask.sum() < MIN_AREA:
                    continue
                cls, confidence = classify_shape(mask)
                core = ndimage.binary_erosion(mask)
                pixels = rgb[core if core.sum() >= 4 else mask]
                color = COLORS[int(nearest_color(np.median(pixels, axis=0)))]
                ys, xs = np.nonzero(mask)
                box = [xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale, (ys.max() + 1) * scale]
                found.setdefault(cls, []).append(Detection(box, confidence, mask, color))
        return found

    def classify_colors(self, image, detections: list[Detection], classname: str) -> list[str]:
        return [d.color for d in detections]
