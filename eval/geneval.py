"""The GenEval scoring rules (Ghosh et al., 2023), once, fed by any detector backend.

A backend turns an image into raw detections per class and classifies the colour of detected
objects; everything else (confidence thresholds, include/exclude logic, the colour count, the
position rule, per-task and overall means) lives here and follows the official
``evaluate_images.py`` / ``summary_scores.py``:

* keep detections with confidence > 0.3 (> 0.9 for ``counting``), most confident first, at most
  16 per class, NMS only if ``max_overlap`` < 1 (off by default);
* ``include`` clauses are ANDed: the first ``count`` detections of the class must exist, at least
  ``count`` of them must have the asked ``color``, and each must hold ``position = [relation,
  group]`` to every object matched by include clause ``group``;
* ``exclude`` clauses are ORed: ``count`` or more detections of the class make the image wrong;
* per-task score = mean correctness over that tag's images; overall = mean of the task scores.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1
GENEVAL_METADATA = Path(__file__).parent / "data" / "geneval" / "evaluation_metadata.jsonl"
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Detection:
    """One detected object: box ``[x1, y1, x2, y2]`` in pixels, confidence, optional mask/colour."""

    box: Sequence[float]
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)
    color: str | None = None  # a backend may know it already (the shapes detector does)


class DetectorBackend(Protocol):
    """What the scorer needs from a detector: raw detections and a colour classifier.

    Optional attributes :func:`score_folder` honours: ``classnames`` (the classes it can detect:
    metadata asking for others is an error) and ``image_size`` (it works on square images of that
    side: other square sizes are resized with a printed notice, non-square images are an error).
    """

    name: str

    def detect(self, image) -> dict[str, list[Detection]]:
        """All candidate detections of ``image`` (PIL), keyed by class name, unthresholded."""

    def classify_colors(self, image, detections: list[Detection], classname: str) -> list[str]:
        """The colour name (one of ``COLORS``) of each detection."""


def compute_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def select_detections(raw: dict[str, list[Detection]], tag: str,
                      max_overlap: float = NMS_THRESHOLD) -> dict[str, list[Detection]]:
    """Threshold, sort by confidence, cap per class and (optionally) suppress overlaps."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for classname, dets in raw.items():
        order = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if max_overlap < 1:
                order = [d for d in order if compute_iou(best.box, d.box) < max_overlap]
        if chosen:
            kept[classname] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      margin: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A to B: the centre offset, shrunk per axis by ``margin`` x (sum of the sizes)."""
    a = np.asarray(box_a[:4], dtype=float).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=float).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = (a[1] - a[0]) + (b[1] - b[0])
    revised = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(detected: dict[str, list[Detection]], metadata: dict,
             classify_colors: Callable[[list[Detection], str], list[str]]
             ) -> tuple[bool, str, list[bool], list[float]]:
    """Apply the include/exclude rules to already-selected detections.

    Returns (correct, reason, clauses, graded). ``clauses`` says which include and exclude clauses
    hold, in order; ``graded`` lists the terms of Flow-GRPO's graded GenEval reward: per include
    clause 1 - |n - k| / n for k detected of the n asked, then, if the clause has a colour or a
    position, 1 - |n - k_colour| / n and 1 or 0 for the relation (0 when k != n). Both are for
    partial-credit rewards; GenEval itself only reports ``correct``.
    """
    correct = True
    reasons = []
    graded: list[float] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        classname, count = req["class"], req["count"]
        matched = True
        found = detected.get(classname, [])[:count]
        n_found = len(detected.get(classname, []))
        graded.append(1 - abs(count - n_found) / count)
        if n_found != count:
            graded += [0.0] * (("color" in req) + ("position" in req))
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = classify_colors(found, classname)
                if n_found == count:
                    graded.append(1 - abs(count - colors.count(req["color"])) / count)
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {classname}>={count}, found "
                                   f"{colors.count(req['color'])} {req['color']}; and {seen}")
            if "position" in req and matched:
                relation, group = req["position"]
                if matched_groups[group] is None:
                    correct = matched = False
                    reasons.append(f"no target for {classname} to be {relation}")
                else:
                    for obj in found:
                        for target in matched_groups[group]:
                            true_rels = relative_position(obj.box, target.box)
                            if relation not in true_rels:
                                correct = matched = False
                                reasons.append(f"expected {classname} {relation} target, found "
                                               f"{' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
                if n_found == count:
                    graded.append(float(matched))
        matched_groups.append(found if matched else None)
    clauses = [group is not None for group in matched_groups]
    for req in metadata.get("exclude", []):
        classname = req["class"]
        clauses.append(len(detected.get(classname, [])) < req["count"])
        if not clauses[-1]:
            correct = False
            reasons.append(f"expected {classname}<{req['count']}, found {len(detected[classname])}")
    return correct, "\n".join(reasons), clauses, graded


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _clause_problem(clause, index: int, kind: str) -> str | None:
    """What is wrong with one include/exclude clause, or None."""
    if not isinstance(clause, dict):
        return "is not an object"
    missing = [k for k in ("class", "count") if k not in clause]
    if missing:
        return f"lacks {' and '.join(json.dumps(k) for k in missing)}"
    if not isinstance(clause["class"], str):
        return "has a non-string \"class\""
    if not _is_count(clause["count"]):
        return "has a \"count\" that is not a whole number >= 1"
    if kind == "include" and "color" in clause and clause["color"] not in COLORS:
        return f"has \"color\" {clause['color']!r}, not one of GenEval's colours ({', '.join(COLORS)})"
    if kind == "include" and "position" in clause:
        pos = clause["position"]
        if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
                and isinstance(pos[1], int) and not isinstance(pos[1], bool) and 0 <= pos[1] < index):
            return (f"has \"position\" {json.dumps(pos)}; it must be [relation, i] with relation one of "
                    f"{', '.join(RELATIONS)} and i the index of an earlier include clause")
    return None


def check_metadata(metadata, where: str = "metadata") -> None:
    """Raise ValueError, starting with ``where``, unless ``metadata`` is what GenEval's rules read.

    That is an object with strings ``prompt`` and ``tag``, ``include`` a list of ``{"class", "count"}``
    objects (``count`` >= 1; optional ``color`` among ``COLORS`` and ``position`` ``[relation, index of
    an earlier clause]``) and optionally ``exclude``, a list of ``{"class", "count"}`` objects.
    """
    from eval.layout import EXAMPLE_METADATA

    fix = f"GenEval metadata looks like {EXAMPLE_METADATA}"
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: metadata is a {type(metadata).__name__}, not a JSON object; {fix}")
    missing = [k for k in ("tag", "include", "prompt") if k not in metadata]
    if missing:
        raise ValueError(
            f"{where}: metadata lacks {' and '.join(json.dumps(k) for k in missing)}; GenEval's rules need "
            '"tag" (the task, e.g. "counting"), "include" (the objects asked for, a list of {"class": ..., '
            '"count": ...} objects) and "prompt": ' + fix)
    for key in ("tag", "prompt"):
        if not isinstance(metadata[key], str):
            raise ValueError(f"{where}: metadata \"{key}\" is {json.dumps(metadata[key])}, not a string; {fix}")
    for kind in ("include", "exclude"):
        clauses = metadata.get(kind, [])
        if not isinstance(clauses, list):
            raise ValueError(f"{where}: metadata \"{kind}\" is {json.dumps(clauses)}, not a list of "
                             f'{{"class": ..., "count": ...}} objects; {fix}')
        for i, clause in enumerate(clauses):
            problem = _clause_problem(clause, i, kind)
            if problem:
                raise ValueError(f"{where}: metadata {kind}[{i}] ({json.dumps(clause)}) {problem}; each {kind} "
                                 f'clause is an object like {{"class": "cat", "count": 2}}; {fix}')


def evaluate_image(backend: DetectorBackend, image, metadata: dict, filename: str = "",
                   with_clauses: bool = False) -> dict:
    """One row of GenEval's results.jsonl for ``image`` generated from ``metadata``.

    ``with_clauses`` adds the per-clause outcomes and the graded terms (not official columns) for
    partial-credit rewards.
    """
    check_metadata(metadata, filename or "metadata")
    detected = select_detections(backend.detect(image), metadata["tag"])
    correct, reason, clauses, graded = evaluate(
        detected, metadata, lambda dets, cls: backend.classify_colors(image, dets, cls))
    row = {
        "filename": filename,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps({cls: [[float(v) for v in d.box] + [float(d.score)] for d in dets]
                               for cls, dets in detected.items()}),
    }
    if with_clauses:
        row["clauses"] = clauses
        row["graded"] = graded
    return row


def summarize(results: list[dict]) -> dict:
    """GenEval's summary: image/prompt accuracy, per-task means (first-seen order), overall."""
    if not results:
        raise ValueError("no results to summarise")
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, bool] = {}
    for row in results:
        by_tag.setdefault(row["tag"], []).append(bool(row["correct"]))
        by_prompt[row["metadata"]] = by_prompt.get(row["metadata"], False) or bool(row["correct"])
    tasks = {tag: {"score": float(np.mean(v)), "correct": int(sum(v)), "total": len(v)}
             for tag, v in by_tag.items()}
    overall_se = sampling_standard_error(results, list(tasks))
    return {
        "total_images": len(results),
        "total_prompts": len(by_prompt),
        "correct_images": float(np.mean([bool(r["correct"]) for r in results])),
        "correct_prompts": float(np.mean(list(by_prompt.values()))),
        "tasks": tasks,
        "overall": float(np.mean([t["score"] for t in tasks.values()])),
        "overall_se": overall_se,
    }


def sampling_standard_error(results: list[dict], tags: list[str]) -> float:
    """Standard error of the overall score from image sampling alone, the prompts held fixed.

    Each prompt p of task k succeeds with its own rate q_p; a task score averages N_k images, so
    Var(score_k) = sum_p n_p q_p (1 - q_p) / N_k^2 and Var(overall) = sum_k Var(score_k) / K^2, with
    the unbiased n/(n-1) q(1-q) per prompt (0 for a prompt with one image). It is what a second
    evaluation with other seeds would scatter by: on the 62-prompt shapes split with 4 images per
    prompt it is several hundredths, so compare runs with more images per prompt (or several seeds).
    """
    by_tag: dict[str, dict[str, list[bool]]] = {}
    for row in results:
        by_tag.setdefault(row["tag"], {}).setdefault(row["metadata"], []).append(bool(row["correct"]))
    variance = 0.0
    for tag in tags:
        prompts = by_tag[tag].values()
        # n_p * n/(n-1) * q(1-q) with q = k/n is k(n-k)/(n-1).
        spread = sum(sum(v) * (len(v) - sum(v)) / (len(v) - 1) for v in prompts if len(v) > 1)
        variance += spread / sum(len(v) for v in prompts) ** 2
    return float(np.sqrt(variance) / len(tags))


def paired_standard_error(before: list[dict], after: list[dict]) -> float:
    """Standard error of ``after``'s overall score minus ``before``'s, for two evaluations of the same
    images (prompts and seeds): the gain's own error, from image sampling alone.

    With d = correct_after - correct_before per image, a task's gain averages N_k of them, so
    Var(gain_k) = sum_p n_p s_p^2 / N_k^2 (s_p^2 the unbiased variance of d over prompt p's images) and
    Var(gain) = sum_k Var(gain_k) / K^2. A fine-tuned model sampled from the same noise keeps most
    of the base's verdicts, so this is much smaller than the two scores' standard errors combined.
    """
    was = {r["filename"]: bool(r["correct"]) for r in before}
    if set(was) != {r["filename"] for r in after}:
        raise ValueError("a paired standard error needs two evaluations of the same images (prompts and seeds)")
    by_tag: dict[str, dict[str, list[int]]] = {}
    for row in after:
        by_tag.setdefault(row["tag"], {}).setdefault(row["metadata"], []).append(
            int(bool(row["correct"])) - int(was[row["filename"]]))
    variance = 0.0
    for prompts in by_tag.values():
        spread = sum(len(d) * np.var(d, ddof=1) for d in prompts.values() if len(d) > 1)
        variance += spread / sum(len(d) for d in prompts.values()) ** 2
    return float(np.sqrt(variance) / len(by_tag))


def format_summary(summary: dict) -> str:
    """The printout of GenEval's ``summary_scores.py``."""
    lines = [
        "Summary", "=======",
        f"Total images: {summary['total_images']}",
        f"Total prompts: {summary['total_prompts']}",
        f"% correct images: {summary['correct_images']:.2%}",
        f"% correct prompts: {summary['correct_prompts']:.2%}",
        "", "Task breakdown", "==============",
    ]
    for tag, t in summary["tasks"].items():
        lines.append(f"{tag:<16} = {t['score']:.2%} ({t['correct']} / {t['total']})")
    lines.append("")
    if "overall_se" in summary:  # not in GenEval's printout; summaries written before it lack it
        lines.append(f"Standard error of the overall score (image sampling): {summary['overall_se']:.5f}")
    lines += [f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)


BACKENDS = {"shapes": "eval.shapes.detector:ShapesDetector", "hf": "eval.hf_backend:HFDetector"}


def get_backend(name: str) -> DetectorBackend:
    """Instantiate a detector backend by name (``--backend``)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown detector backend {name!r}; available: {', '.join(BACKENDS)}")
    module, attr = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), attr)()


def check_known_classes(backend: DetectorBackend, metadata: dict, where: str) -> None:
    """Raise ValueError if ``metadata`` asks for classes ``backend.classnames`` lacks (such clauses
    could never hold, so every image would silently score wrong)."""
    known = getattr(backend, "classnames", None)
    if known is None:
        return
    asked = [c["class"] for kind in ("include", "exclude") for c in metadata.get(kind, [])]
    unknown = sorted(set(asked) - set(known))
    if unknown:
        raise ValueError(f"{where}: metadata asks for {', '.join(map(repr, unknown))}, which the "
                         f"{backend.name} detector cannot detect (its classes: {', '.join(known)}); score "
                         "these images with a backend that knows them (--backend hf for GenEval's 80 classes)")


def check_image_sizes(paths: list[Path], backend: DetectorBackend, folder: str | Path = "") -> Counter:
    """Sizes the backend cannot take as they are: raise ValueError naming the first non-square image
    if the backend works on square images (``image_size``); return a Counter of the square sizes it
    will resize. Reads image headers only; unreadable files are errors naming them."""
    from eval.layout import image_size

    side = getattr(backend, "image_size", None)
    if not side:
        return Counter()
    sizes = {path: image_size(path) for path in paths}
    odd = [(path, size) for path, size in sizes.items() if size[0] != size[1]]
    if odd:
        path, (w, h) = odd[0]
        more = f" ({len(odd) - 1} more non-square images in {folder})" if len(odd) > 1 else ""
        raise ValueError(f"{path}: image is {w}x{h}, not square{more}; the {backend.name} detector works on "
                         f"{side}x{side} images and will not squash a non-square one: crop or resize the images "
                         f"to square (e.g. {side}x{side}) and score again")
    return Counter(size for size in sizes.values() if size != (side, side))


def resize_notice(resized: Counter, backend: DetectorBackend) -> str:
    """"resizing 4 images from 128x128 to 64x64 for the shapes detector (...)"."""
    side = backend.image_size
    parts = " and ".join(f"{n} image{'s' if n != 1 else ''} from {w}x{h}" for (w, h), n in resized.items())
    return (f"note: resizing {parts} to {side}x{side} for the {backend.name} detector, which works at "
            f"{side}x{side} (box filter; boxes in the results stay in the images' own pixels)")


def score_folder(images: str | Path, backend: DetectorBackend, progress: bool = True) -> list[dict]:
    """Score every sample of a GenEval-layout folder; rows in folder order.

    Everything is checked before scoring starts: the layout, each folder's metadata (GenEval's keys,
    classes the backend knows) and the image files and sizes; a problem is a ValueError (or
    FileNotFoundError) starting with the offending path. Resizing for the backend is announced once
    on stderr.
    """
    from tqdm.auto import tqdm

    from eval.layout import iter_images, load_image

    def check(metadata: dict, meta_file: Path) -> None:
        check_metadata(metadata, str(meta_file))
        check_known_classes(backend, metadata, str(meta_file))

    items = list(iter_images(images, check=check))
    if hasattr(backend, "check_classes"):  # e.g. the hf backend: which classes its checkpoint's labels map to
        try:
            backend.check_classes({c["class"] for _, m, _ in items for kind in ("include", "exclude")
                                   for c in m.get(kind, [])})
        except ValueError as err:
            raise ValueError(f"{images}: {err}") from None
    resized = check_image_sizes([path for _, _, path in items], backend, images)
    if resized:
        print(resize_notice(resized, backend), file=sys.stderr)
        noted = getattr(backend, "noted_sizes", None)
        if noted is not None:  # the backend need not announce these sizes again
            noted.update(resized)
    rows = []
    for filename, metadata, path in tqdm(items, desc="scoring", disable=not progress):
        rows.append(evaluate_image(backend, load_image(path), metadata, filename))
    return rows


def write_results(rows: list[dict], out: str | Path) -> dict:
    """Write results.jsonl and ``<stem>_summary.json`` beside it; return the summary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(rows)
    out.with_name(out.stem + "_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
