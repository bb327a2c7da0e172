"""The shapes-world commands end to end: prompts -> render -> eval geneval."""

import json

import pytest

from finetune.cli import main


def test_prompts_render_and_score_ground_truth(tmp_path, capsys):
    meta = tmp_path / "eval.jsonl"
    assert main(["shapes", "prompts", "--split", "eval", "--out", str(meta)]) == 0
    assert len(meta.read_text().splitlines()) == 62
    images = tmp_path / "gt"
    assert main(["shapes", "render", "--metadata", str(meta), "--out", str(images), "--images-per-prompt", "2"]) == 0
    assert (images / "00000" / "metadata.jsonl").exists()
    assert (images / "00061" / "samples" / "0001.png").exists()
    out = tmp_path / "scores" / "results.jsonl"
    capsys.readouterr()
    assert main(["eval", "geneval", "--images", str(images), "--backend", "shapes", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("Overall score (avg. over tasks): ")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 124
    assert set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert rows[0]["filename"] == "00000/samples/0000.png"
    summary = json.loads((out.parent / "results_summary.json").read_text())
    assert summary["overall"] == pytest.approx(float(printed[-1].split(": ")[1]), abs=1e-5)
    assert summary["overall"] >= 0.99


def test_clear_errors_for_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "colors", "include": [], "prompt": "x"}\n{"tag": \n')
    assert main(["shapes", "render", "--metadata", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "img.png").write_bytes(b"")
    assert main(["eval", "geneval", "--images", str(tmp_path / "flat"), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "GenEval's layout" in capsys.readouterr().err
    assert main(["eval", "geneval", "--images", str(tmp_path), "--backend", "yolo", "--out", "r.jsonl"]) == 2
    assert "unknown detector backend 'yolo'; available: shapes" in capsys.readouterr().err
    assert main(["sample", "--model", "./no/such/model", "--metadata", str(bad), "--out", "x"]) == 2
    assert "model path './no/such/model' does not exist" in capsys.readouterr().err


def test_rewards_list_and_score(tmp_path, capsys):
    assert main(["rewards", "list"]) == 0
    listed = capsys.readouterr().out
    assert "geneval" in listed and "jpeg_compressibility" in listed and "pickscore" in listed
    meta = tmp_path / "m.jsonl"
    main(["shapes", "prompts", "--split", "eval", "--out", str(meta)])
    lines = meta.read_text().splitlines()[:3]
    meta.write_text("\n".join(lines) + "\n")
    main(["shapes", "render", "--metadata", str(meta), "--out", str(tmp_path / "gt"), "--images-per-prompt", "1"])
    capsys.readouterr()
    assert main(["rewards", "score", "--reward", "geneval", "--images", str(tmp_path / "gt")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "mean 1.0000 over 3 images"
    png = tmp_path / "gt" / "00000" / "samples" / "0000.png"
    assert main(["rewards", "score", "--reward", "jpeg_compressibility", "--images", str(png),
                 "--prompts", "anything"]) == 0
    assert "over 1 images" in capsys.readouterr().out


def test_category_grids_frame_correct_and_wrong_samples(tmp_path):
    from PIL import Image

    from eval import geneval
    from eval.report import category_grids
    from eval.shapes import grammar

    records = [r for r in grammar.split("eval") if r["tag"] in ("counting", "colors")][:5]
    meta = tmp_path / "m.jsonl"
    grammar.write_jsonl(records, meta)
    main(["shapes", "render", "--metadata", str(meta), "--out", str(tmp_path / "gt"), "--images-per-prompt", "2"])
    rows = geneval.score_folder(tmp_path / "gt", geneval.get_backend("shapes"), progress=False)
    assert all(r["correct"] for r in rows)
    rows[0]["correct"] = False  # pretend the first sample of the first prompt failed
    paths = category_grids(tmp_path / "gt", rows, tmp_path / "grids", per_prompt=2, max_prompts=3)
    assert sorted(p.name for p in paths) == sorted(f"grid_{t}.png" for t in {r["tag"] for r in records})
    first = Image.open(tmp_path / "grids" / f"grid_{records[0]['tag']}.png").convert("RGB")
    n_rows = min(3, sum(r["tag"] == records[0]["tag"] for r in records))
    assert first.size == (200 + 2 * 72, n_rows * 72)
    assert first.getpixel((201, 1)) == (200, 0, 0)  # the failed sample: red frame
    assert first.getpixel((200 + 72 + 1, 1)) == (0, 160, 0)  # its neighbour: green frame


def test_comparison_grid_labels_columns_and_frames_each_verdict(tmp_path):
    import json

    import numpy as np

    from PIL import Image

    from eval import geneval
    from eval.report import comparison_grid
    from eval.shapes import grammar

    records = [r for r in grammar.split("eval") if r["tag"] in ("counting", "colors")][:5]
    grammar.write_jsonl(records, tmp_path / "m.jsonl")
    for name in ("before", "after"):
        main(["shapes", "render", "--metadata", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / name / "images"),
              "--images-per-prompt", "2"])
        rows = geneval.score_folder(tmp_path / name / "images", geneval.get_backend("shapes"), progress=False)
        if name == "before":
            rows[0]["correct"] = False  # the first sample of the first prompt failed before
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = comparison_grid({"base": tmp_path / "before", "tuned": tmp_path / "after"}, tmp_path / "cmp.png",
                          samples=2)
    sheet = Image.open(out).convert("RGB")
    size, block, pad = 64 * 2 + 8, 2 * (64 * 2 + 8), 12
    assert sheet.size == (2 * block + pad, 22 + 2 * (size + 16))  # one prompt per task, two tasks
    assert sheet.getpixel((1, 23)) == (200, 0, 0)  # before, first sample: red
    assert sheet.getpixel((size + 1, 23)) == (0, 160, 0)
    assert sheet.getpixel((block + pad + 1, 23)) == (0, 160, 0)  # after, same seed: green
    assert np.asarray(sheet.crop((0, 0, 60, 20)).convert("L")).min() < 100  # a label is written on top
