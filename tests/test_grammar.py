import json

import pytest

from eval.shapes import grammar


def prompts(records):
    return {r["prompt"] for r in records}


def test_prompts_are_worded_like_geneval():
    everything = [r for rs in grammar.all_prompts().values() for r in rs]
    texts = prompts(everything)
    for expected in ["a photo of a red circle", "a photo of three stars", "a photo of a square right of a star",
                     "a photo of a purple circle and a black star", "a photo of a circle and a star",
                     "a photo of an orange triangle", "a photo of two squares",
                     "a photo of a white star", "a photo of a triangle above a circle"]:
        assert expected in texts
    assert "a photo of a orange triangle" not in texts


def test_schema_of_each_tag():
    by_tag = grammar.all_prompts()
    assert set(by_tag) == set(grammar.TAGS)
    counting = next(r for r in by_tag["counting"] if r["prompt"] == "a photo of three stars")
    assert counting["include"] == [{"class": "star", "count": 3}]
    assert counting["exclude"] == [{"class": "star", "count": 4}]
    pos = next(r for r in by_tag["position"] if r["prompt"] == "a photo of a square right of a star")
    # Same clause order as GenEval: target first, then the object holding the relation to group 0.
    assert pos["include"] == [{"class": "star", "count": 1},
                              {"class": "square", "count": 1, "position": ["right of", 0]}]
    attr = next(r for r in by_tag["color_attr"] if r["prompt"] == "a photo of a purple circle and a black star")
    assert [c["color"] for c in attr["include"]] == ["purple", "black"]
    assert list(pos) == ["tag", "include", "prompt"]
    for records in by_tag.values():
        for r in records:
            for clause in r["include"]:
                assert clause["class"] in grammar.CLASSES and 1 <= clause["count"] <= 4
                assert clause.get("color", "red") in grammar.COLORS


def test_splits_are_disjoint_seeded_and_cover_every_tag():
    train, eval_ = grammar.split("train"), grammar.split("eval")
    assert not prompts(train) & prompts(eval_)
    assert len(train) + len(eval_) == sum(len(v) for v in grammar.all_prompts().values())
    assert {r["tag"] for r in eval_} == {r["tag"] for r in train} == set(grammar.TAGS)
    assert grammar.split("eval") == eval_
    assert prompts(grammar.split("eval", seed=7)) != prompts(eval_)
    with pytest.raises(ValueError, match="split"):
        grammar.split("test")


def test_jsonl_roundtrip_and_malformed_line(tmp_path):
    path = tmp_path / "m.jsonl"
    grammar.write_jsonl(grammar.split("eval"), path)
    assert grammar.read_jsonl(path) == grammar.split("eval")
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-3]
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"m.jsonl:3"):
        grammar.read_jsonl(path)
    path.write_text(json.dumps({"tag": "colors", "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="include"):
        grammar.read_jsonl(path)
