"""Renderer + rule detector + scorer on ground truth, on perturbed ground truth, and on edits."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from eval import geneval
from eval.shapes import grammar, render
from eval.shapes.detector import ShapesDetector

DETECTOR = ShapesDetector()


def score(records, images_per_prompt=4, perturb=lambda im, rng: im):
    rng = np.random.default_rng(0)
    rows = []
    for i, record in enumerate(records):
        for j in range(images_per_prompt):
            image, _ = render.render(record, seed=i * 1000 + j)
            rows.append(geneval.evaluate_image(DETECTOR, perturb(image, rng), record))
    return geneval.summarize(rows)


def find(tag, prompt):
    return next(r for r in grammar.all_prompts()[tag] if r["prompt"] == prompt)


def judge(objects, record):
    row = geneval.evaluate_image(DETECTOR, render.draw(objects), record)
    return row["correct"], row["reason"]


def test_ground_truth_of_the_eval_split_scores_perfectly():
    s = score(grammar.split("eval"))
    assert s["overall"] >= 0.99
    assert all(t["score"] >= 0.98 for t in s["tasks"].values()), s["tasks"]
    assert set(s["tasks"]) == set(grammar.TAGS)


def test_renders_are_64px_on_the_neutral_background_and_seeded():
    record = find("color_attr", "a photo of a purple circle and a black star")
    a, objs = render.render(record, seed=3)
    b, _ = render.render(record, seed=3)
    c, _ = render.render(record, seed=4)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert np.asarray(a)[0, 0].tolist() == list(render.BACKGROUND)
    assert [(o.cls, o.color) for o in objs] == [("circle", "purple"), ("star", "black")]


def test_detector_reports_box_mask_confidence_and_colour():
    objects = [render.Placed("triangle", "orange", 20, 20, 10), render.Placed("square", "blue", 46, 44, 8)]
    found = DETECTOR.detect(render.draw(objects))
    assert set(found) == {"triangle", "square"}
    tri = found["triangle"][0]
    assert tri.color == "orange" and tri.score > 0.9
    assert np.allclose(tri.box, [10, 10, 30, 30], atol=1.5)
    assert tri.mask.shape == (64, 64) and 150 < tri.mask.sum() < 250  # about half the 20x20 box
    assert found["square"][0].color == "blue"


@pytest.mark.parametrize("kind", ["blur", "noise", "drift"])
def test_detector_tolerates_blur_noise_and_colour_drift(kind):
    def perturb(image, rng):
        if kind == "blur":
            return image.filter(ImageFilter.GaussianBlur(0.8))
        a = np.asarray(image, np.float32)
        a = a + (rng.normal(0, 12, a.shape) if kind == "noise" else rng.uniform(-25, 25, 3))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    s = score(grammar.split("eval"), images_per_prompt=2, perturb=perturb)
    assert s["overall"] >= 0.85, s["tasks"]


def test_removing_an_object_flips_to_incorrect():
    record = find("two_object", "a photo of a circle and a star")
    _, objects = render.render(record, seed=1)
    assert judge(objects, record) == (True, "")
    assert judge(objects[:1], record) == (False, "expected star>=1, found 0")


def test_recolouring_an_object_flips_to_incorrect():
    record = find("colors", "a photo of a red square")
    _, objects = render.render(record, seed=1)
    assert judge(objects, record)[0]
    blue = [dataclasses.replace(objects[0], color="blue")]
    assert judge(blue, record) == (False, "expected red square>=1, found 0 red; and 1 blue")


def test_moving_an_object_flips_to_incorrect():
    record = find("position", "a photo of a square right of a star")
    star = render.Placed("star", "green", 18, 30, 8)
    square = render.Placed("square", "red", 46, 34, 8)
    assert judge([star, square], record) == (True, "")
    moved = dataclasses.replace(square, cx=18, cy=52)  # now below the star, no longer right of it
    ok, reason = judge([star, moved], record)
    assert not ok and reason == "expected square right of target, found below target"


def test_counting_too_few_and_too_many():
    record = find("counting", "a photo of three stars")
    _, objects = render.render(record, seed=2)
    assert judge(objects, record)[0]
    assert judge(objects[:2], record) == (False, "expected star>=3, found 2")
    extra = render.Placed("star", "white", 0, 0, 5)
    for cx, cy in [(7, 7), (56, 7), (7, 56), (56, 56), (32, 32)]:
        extra.cx, extra.cy = cx, cy
        if all(abs(cx - o.cx) > o.r + 8 or abs(cy - o.cy) > o.r + 8 for o in objects):
            break
    assert judge(objects + [extra], record) == (False, "expected star<4, found 4")


def test_geneval_reward_modes_on_renders():
    from rewards.base import build_reward

    record = find("counting", "a photo of three stars")
    _, objects = render.render(record, seed=2)
    images = torch.stack([torch.from_numpy(np.asarray(render.draw(o), dtype=np.float32) / 255).permute(2, 0, 1)
                          for o in (objects, objects[:2], objects[:1])])
    meta = [record] * 3
    strict = build_reward({"name": "geneval"})(images, [record["prompt"]] * 3, meta)
    graded = build_reward({"name": "geneval", "partial_credit": "graded"})(images, [record["prompt"]] * 3, meta)
    assert strict.scores.tolist() == [1.0, 0.0, 0.0]
    assert graded.scores.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])  # 1 - |3 - k| / 3
    assert graded.info["correct"].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="reward.partial_credit"):
        build_reward({"name": "geneval", "partial_credit": "soft"})
