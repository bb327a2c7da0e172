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


@dataclass
class Detection:
    """One detected object: box ``[x1, y1, x2, y2]`` in pixels, confidence, optional mask/colour."""

    box: Sequence[float]
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)
    color: str | None = None  # a backend may know it already (the shapes detector does)


class DetectorBackend(Protocol):
    """What the scorer needs from a detector: raw detections and a colour classifier."""

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


def evaluate_image(backend: DetectorBackend, image, metadata: dict, filename: str = "",
                   with_clauses: bool = False) -> dict:
    """One row of GenEval's results.jsonl for ``image`` generated from ``metadata``.

    ``with_clauses`` adds the per-clause outcomes and the graded terms (not official columns) for
    partial-credit rewards.
    """
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


def score_folder(images: str | Path, backend: DetectorBackend, progress: bool = True) -> list[dict]:
    """Score every sample of a GenEval-layout folder; rows in folder order."""
    from tqdm.auto import tqdm

    from eval.layout import iter_images, load_image

    rows = []
    for filename, metadata, path in tqdm(list(iter_images(images)), desc="scoring", disable=not progress):
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
