"""The official GenEval rules on hand-made detections (no detector involved)."""

import json

import pytest

from eval import geneval
from eval.geneval import Detection
from eval.shapes.grammar import read_jsonl


class FakeBackend:
    """Returns fixed raw detections; colours come from the detections themselves."""

    name = "fake"

    def __init__(self, raw):
        self.raw = raw

    def detect(self, image):
        return self.raw

    def classify_colors(self, image, detections, classname):
        return [d.color for d in detections]


def det(x1, y1, x2, y2, score=0.95, color=None):
    return Detection([x1, y1, x2, y2], score, None, color)


def judge(raw, metadata):
    row = geneval.evaluate_image(FakeBackend(raw), None, metadata)
    return row["correct"], row["reason"]


def test_confidence_threshold_is_strict_and_counting_uses_point_nine():
    one = {"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "p"}
    assert judge({"cup": [det(0, 0, 5, 5, 0.31)]}, one)[0]
    assert not judge({"cup": [det(0, 0, 5, 5, 0.30)]}, one)[0]
    two = {"tag": "counting", "include": [{"class": "cup", "count": 2}],
           "exclude": [{"class": "cup", "count": 3}], "prompt": "p"}
    cups = [det(0, 0, 5, 5, 0.95), det(10, 0, 15, 5, 0.91)]
    assert judge({"cup": cups}, two)[0]
    assert judge({"cup": cups + [det(20, 0, 25, 5, 0.9)]}, two)[0]  # 0.9 is not > 0.9: ignored
    ok, reason = judge({"cup": cups + [det(20, 0, 25, 5, 0.92)]}, two)
    assert not ok and reason == "expected cup<3, found 3"
    ok, reason = judge({"cup": [det(0, 0, 5, 5, 0.95), det(10, 0, 15, 5, 0.85)]}, two)
    assert not ok and reason == "expected cup>=2, found 1"


def test_max_objects_per_class():
    many = [det(i, 0, i + 1, 1, 0.5 + i / 100) for i in range(20)]
    kept = geneval.select_detections({"dot": many}, "single_object")
    assert len(kept["dot"]) == geneval.MAX_OBJECTS == 16
    assert [d.score for d in kept["dot"]] == sorted((d.score for d in many), reverse=True)[:16]


def test_color_check_uses_the_most_confident_count_objects():
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "p"}
    assert judge({"cup": [det(0, 0, 5, 5, 0.9, "red"), det(9, 0, 14, 5, 0.5, "blue")]}, meta)[0]
    ok, reason = judge({"cup": [det(0, 0, 5, 5, 0.9, "blue"), det(9, 0, 14, 5, 0.5, "red")]}, meta)
    assert not ok and reason == "expected red cup>=1, found 0 red; and 1 blue"


def test_position_margin_just_inside_and_just_outside():
    meta = {"tag": "position", "prompt": "a photo of a cup right of a dog",
            "include": [{"class": "dog", "count": 1}, {"class": "cup", "count": 1, "position": ["right of", 0]}]}
    dog = det(0, 0, 10, 10)
    # Centre offset (6, 5), |offset| = sqrt(61). Sizes 10+10: revised dx = (6 - 0.1*20) / sqrt(61)
    # = 0.5121 > 0.5 -> "right of". Sizes 11+11: (6 - 2.2) / sqrt(61) = 0.4865 -> no relation.
    assert judge({"dog": [dog], "cup": [det(6, 5, 16, 15)]}, meta)[0]
    big_dog, big_cup = det(-0.5, -0.5, 10.5, 10.5), det(5.5, 4.5, 16.5, 15.5)
    ok, reason = judge({"dog": [big_dog], "cup": [big_cup]}, meta)
    assert not ok and reason == "expected cup right of target, found  target"
    assert geneval.relative_position([6, 5, 16, 15], [0, 0, 10, 10]) == {"right of"}
    # Without the 0.1 margin the second case would be "right of": the margin is what decides.
    assert "right of" in geneval.relative_position(big_cup.box, big_dog.box, margin=0.0)
    assert geneval.relative_position([0, 0, 10, 10], [0, 30, 10, 40]) == {"above"}
    assert geneval.relative_position([0, 30, 10, 40], [0, 0, 10, 10]) == {"below"}
    assert geneval.relative_position([0, 0, 10, 10], [1, 1, 11, 11]) == set()


def test_position_without_a_matched_target():
    meta = {"tag": "position", "prompt": "p",
            "include": [{"class": "dog", "count": 1}, {"class": "cup", "count": 1, "position": ["left of", 0]}]}
    ok, reason = judge({"cup": [det(0, 0, 5, 5)]}, meta)
    assert not ok and reason == "expected dog>=1, found 0\nno target for cup to be left of"


def summary_by_hand(rows):
    tags, scores = [], {}
    for r in rows:
        if r["tag"] not in scores:
            tags.append(r["tag"])
            scores[r["tag"]] = []
        scores[r["tag"]].append(1.0 if r["correct"] else 0.0)
    task = [sum(v) / len(v) for v in (scores[t] for t in tags)]
    prompts = {}
    for r in rows:
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or r["correct"]
    return {
        "overall": sum(task) / len(task),
        "correct_images": sum(r["correct"] for r in rows) / len(rows),
        "correct_prompts": sum(prompts.values()) / len(prompts),
        "tags": tags,
    }


def test_summary_matches_the_summary_rules_on_a_hand_made_results_file():
    rows = []
    pattern = {"single_object": [1, 1, 1, 0], "counting": [0, 0, 1, 0, 0, 0], "colors": [1, 0, 1],
               "two_object": [0, 0, 0, 0, 0], "position": [1, 1, 0, 1, 0, 0, 1], "color_attr": [0, 1]}
    for tag, outcomes in pattern.items():
        for k, c in enumerate(outcomes):
            meta = json.dumps({"tag": tag, "prompt": f"{tag} {k // 2}"})  # two images per prompt
            rows.append({"tag": tag, "metadata": meta, "correct": bool(c)})
    s = geneval.summarize(rows)
    hand = summary_by_hand(rows)
    assert abs(s["overall"] - hand["overall"]) < 1e-9
    assert abs(s["overall"] - (3 / 4 + 1 / 6 + 2 / 3 + 0 + 4 / 7 + 1 / 2) / 6) < 1e-9
    assert abs(s["correct_images"] - hand["correct_images"]) < 1e-9
    assert abs(s["correct_prompts"] - hand["correct_prompts"]) < 1e-9
    assert list(s["tasks"]) == hand["tags"]
    text = geneval.format_summary(s)
    assert text.splitlines()[-1] == f"Overall score (avg. over tasks): {hand['overall']:.5f}"
    assert "counting         = 16.67% (1 / 6)" in text


def test_real_geneval_metadata_parses_and_scores():
    records = read_jsonl(geneval.GENEVAL_METADATA)
    assert len(records) == 553
    assert {r["tag"] for r in records} == {"single_object", "two_object", "counting", "colors", "position",
                                           "color_attr"}
    by_prompt = {r["prompt"]: r for r in records}
    dog_teddy = by_prompt["a photo of a dog right of a teddy bear"]
    assert judge({"teddy bear": [det(0, 0, 100, 100)], "dog": [det(300, 20, 400, 120)]}, dog_teddy)[0]
    assert not judge({"teddy bear": [det(300, 0, 400, 100)], "dog": [det(0, 20, 100, 120)]}, dog_teddy)[0]
    clocks = by_prompt["a photo of two clocks"]
    assert judge({"clock": [det(0, 0, 9, 9), det(20, 0, 29, 9)]}, clocks)[0]
    assert not judge({"clock": [det(0, 0, 9, 9), det(20, 0, 29, 9), det(40, 0, 49, 9)]}, clocks)[0]
    glass = by_prompt["a photo of a purple wine glass and a black apple"]
    assert judge({"wine glass": [det(0, 0, 9, 9, color="purple")], "apple": [det(20, 0, 29, 9, color="black")]}, glass)[0]
    ok, reason = judge({"wine glass": [det(0, 0, 9, 9, color="purple")], "apple": [det(20, 0, 29, 9, color="red")]}, glass)
    assert not ok and reason.startswith("expected black apple>=1, found 0 black")


def graded(raw, metadata):
    return geneval.evaluate_image(FakeBackend(raw), None, metadata, with_clauses=True)["graded"]


def test_graded_terms_follow_flow_grpo_reward():
    three = {"tag": "counting", "include": [{"class": "cup", "count": 3}],
             "exclude": [{"class": "cup", "count": 4}], "prompt": "p"}
    cups = [det(10 * i, 0, 10 * i + 5, 5) for i in range(5)]
    assert graded({"cup": cups[:3]}, three) == [1.0]
    assert graded({"cup": cups[:2]}, three) == [1 - 1 / 3]  # one short
    assert graded({"cup": cups[:5]}, three) == [1 - 2 / 3]  # two too many (the exclude clause is not graded)
    assert graded({}, three) == [0.0]
    # Colour: two asked, both found, one of them red -> 1 - |2 - 1| / 2; a wrong count zeroes the colour term.
    red = {"tag": "color_attr", "include": [{"class": "cup", "count": 2, "color": "red"}], "prompt": "p"}
    assert graded({"cup": [det(0, 0, 5, 5, color="red"), det(9, 0, 14, 5, color="blue")]}, red) == [1.0, 0.5]
    assert graded({"cup": [det(0, 0, 5, 5, color="red")]}, red) == [0.5, 0.0]
    # Position: 1 or 0 for the relation once the count is exact; 0 when the target is missing.
    left = {"tag": "position", "prompt": "p",
            "include": [{"class": "dog", "count": 1}, {"class": "cup", "count": 1, "position": ["left of", 0]}]}
    assert graded({"dog": [det(30, 0, 40, 10)], "cup": [det(0, 0, 10, 10)]}, left) == [1.0, 1.0, 1.0]
    # A wrong relation: the reference reward code appends 0.0 and then 1.0 (half credit, a mean of 3/4);
    # here it earns nothing (2/3), the one deliberate difference (rewards/geneval.py).
    assert graded({"dog": [det(0, 0, 10, 10)], "cup": [det(30, 0, 40, 10)]}, left) == [1.0, 1.0, 0.0]
    assert graded({"cup": [det(0, 0, 10, 10)]}, left) == [0.0, 1.0, 0.0]
    assert graded({"dog": [det(30, 0, 40, 10)]}, left) == [1.0, 0.0, 0.0]


def test_overall_standard_error_matches_a_hand_computation():
    # Task A: prompt a1 [1, 0] (n/(n-1) q(1-q) = 1/2), a2 [1, 1] (0): Var(score_A) = 2 * 1/2 / 4^2.
    # Task B: prompt b1 [1, 0, 0] (3/2 * 2/9 = 1/3): Var(score_B) = 3 * 1/3 / 3^2.
    # A one-image prompt adds nothing. Var(overall) = (1/16 + 1/9) / 2^2, SE = 5/24.
    outcomes = {("A", "a1"): [1, 0], ("A", "a2"): [1, 1], ("B", "b1"): [1, 0, 0], ("B", "b2"): [1]}
    rows = [{"tag": tag, "metadata": json.dumps({"tag": tag, "prompt": p}), "correct": bool(c)}
            for (tag, p), cs in outcomes.items() for c in cs]
    s = geneval.summarize(rows)
    # With b2's image B has N = 4: Var(score_B) = 1 / 16, so SE = sqrt(2 / 16) / 2.
    assert abs(s["overall_se"] - (2 / 16) ** 0.5 / 2) < 1e-12
    s = geneval.summarize([r for r in rows if json.loads(r["metadata"])["prompt"] != "b2"])
    assert abs(s["overall_se"] - 5 / 24) < 1e-12
    assert "Standard error of the overall score (image sampling): 0.20833" in geneval.format_summary(s)
    # Every prompt always right or always wrong: no sampling noise.
    assert geneval.summarize([dict(r, correct=True) for r in rows])["overall_se"] == 0.0


def test_paired_standard_error_of_a_gain_matches_its_scatter():
    import numpy as np

    # Two tasks of 3 prompts x 8 seeds; per seed the base and the tuned model succeed jointly with
    # the prompt's probabilities (most verdicts kept). The formula must match the gain's scatter
    # over many independent evaluations, and be far below the two scores' errors combined.
    rng = np.random.default_rng(0)
    joint = [[0.5, 0.1, 0.05, 0.35], [0.2, 0.05, 0.15, 0.6], [0.7, 0.0, 0.1, 0.2]]  # p(00), p(10), p(01), p(11)
    prompts = [(tag, k) for tag in ("A", "B") for k in range(3)]

    def evaluation():
        before, after = [], []
        for n, (tag, k) in enumerate(prompts):
            for j, outcome in enumerate(rng.choice(4, size=8, p=joint[k])):
                row = {"tag": tag, "metadata": f"{tag}{k}", "filename": f"{n:05d}/samples/{j:04d}.png"}
                before.append({**row, "correct": outcome in (1, 3)})
                after.append({**row, "correct": outcome in (2, 3)})
        return before, after

    gains, errors, unpaired = [], [], []
    for _ in range(2000):
        before, after = evaluation()
        gains.append(geneval.summarize(after)["overall"] - geneval.summarize(before)["overall"])
        errors.append(geneval.paired_standard_error(before, after))
        unpaired.append(np.hypot(geneval.summarize(after)["overall_se"], geneval.summarize(before)["overall_se"]))
    assert np.sqrt(np.mean(np.square(errors))) == pytest.approx(np.std(gains), rel=0.05)
    assert np.mean(errors) < 0.8 * np.mean(unpaired)
    # With a base that is always wrong, the gain's error is the tuned model's own.
    before, after = evaluation()
    assert geneval.paired_standard_error([dict(r, correct=False) for r in before], after) == pytest.approx(
        geneval.summarize(after)["overall_se"])
    with pytest.raises(ValueError, match="the same images"):
        geneval.paired_standard_error(before[:-1], after)
