"""Object size as the rule detector measures it: the size-condition metric of CTRL's measurement.

An object's half-extent is half the longer side of its detected box (exact for circles, squares and
triangles; 5 % short for stars), in pixels of the 64-pixel canvas; a scene's size class is the class
of its objects' mean half-extent (``render.size_class_of``). Independent of the size classifier
that CTRL trains against, so a model cannot score by fooling that classifier.
"""

from __future__ import annotations

from PIL import Image

from eval.shapes.render import SIZE, size_class_of


def half_extents(detector, image: Image.Image) -> list[float]:
    scale = SIZE / image.size[0]
    return [max(d.box[2] - d.box[0], d.box[3] - d.box[1]) * scale / 2
            for found in detector.detect(image).values() for d in found]


def measured_size_class(detector, image: Image.Image, n_objects: int) -> str | None:
    """The size class of the objects in ``image`` (a scene meant to hold ``n_objects``); None if none is found."""
    radii = half_extents(detector, image)
    return size_class_of(sum(radii) / len(radii), n_objects) if radii else None
