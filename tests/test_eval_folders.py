"""Bad GenEval-layout folders and image files: each is a clear error naming the offending path (and
the fix), or an explicit printed decision; never a traceback, never silent squashing.

Every case drives the library (score_folder / iter_images / load_image) and the CLI, where the error
is printed as ``diffrl: error: <path>: ...`` with exit code 2.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from eval import geneval
from eval.layout import iter_images, load_image, write_prompt
from eval.shapes import grammar, render
from eval.shapes.detector import ShapesDetector
from finetune.cli import main

RECORD = next(r for r in grammar.split("eval") if r["tag"] == "position")


def image(seed=0):
    return render.render(RECORD, seed=seed)[0]


@pytest.fixture
def folder(tmp_path):
    """A good GenEval-layout folder: one prompt, two 64x64 ground-truth renders."""
    root = tmp_path / "images"
    write_prompt(root, 0, RECORD, [image(0), image(1)])
    return root


def meta_file(root):
    return root / "00000" / "metadata.jsonl"


def sample(root, j=0):
    return root / "00000" / "samples" / f"{j:04d}.png"


def cli_error(capsys, args):
    """Run the CLI, expect exit code 2 and one `diffrl: error:` line; return the message."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("diffrl: error: ")]  # after any progress bar
    return line[len("diffrl: error: "):]


def geneval_error(capsys, root, tmp_path):
    message = cli_error(capsys, ["eval", "geneval", "--images", str(root), "--backend", "shapes",
                                 "--out", str(tmp_path / "scores" / "results.jsonl")])
    assert not (tmp_path / "scores" / "results.jsonl").exists()
    return message


def score_error(root, exc=ValueError):
    with pytest.raises(exc) as info:
        geneval.score_folder(root, geneval.get_backend("shapes"), progress=False)
    return str(info.value)


def test_good_folder_scores(folder, tmp_path, capsys):
    rows = geneval.score_folder(folder, geneval.get_backend("shapes"), progress=False)
    assert [r["correct"] for r in rows] == [True, True]
    assert main(["eval", "geneval", "--images", str(folder), "--out", str(tmp_path / "r.jsonl")]) == 0
    assert "note:" not in capsys.readouterr().err  # 64x64 renders: nothing resized


# 1. metadata without GenEval's keys, or with malformed include/exclude clauses.

def test_metadata_without_tag(folder, tmp_path, capsys):
    meta_file(folder).write_text(json.dumps({k: v for k, v in RECORD.items() if k != "tag"}) + "\n")
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{meta_file(folder)}: metadata lacks \"tag\"; GenEval's rules need")
        assert '"include"' in message and "GenEval metadata looks like {" in message


def test_metadata_without_tag_and_include_names_both(folder, tmp_path, capsys):
    meta_file(folder).write_text('{"prompt": "a photo of a circle"}\n')
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{meta_file(folder)}: metadata lacks \"tag\" and \"include\";")


@pytest.mark.parametrize("change, problem", [
    ({"include": "circle"}, 'metadata "include" is "circle", not a list of'),
    ({"include": [{"class": "circle"}]}, 'metadata include[0] ({"class": "circle"}) lacks "count"'),
    ({"include": ["circle"]}, 'metadata include[0] ("circle") is not an object'),
    ({"include": [{"class": "circle", "count": 0}]},
     'metadata include[0] ({"class": "circle", "count": 0}) has a "count" that is not a whole number >= 1'),
    ({"include": [{"class": "circle", "count": 1, "color": "teal"}]},
     'metadata include[0] ({"class": "circle", "count": 1, "color": "teal"}) has "color" \'teal\', not one of'),
    ({"include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]},
     'metadata include[0] ({"class": "circle", "count": 1, "position": ["left of", 0]}) has "position" '
     '["left of", 0]; it must be [relation, i] with relation one of left of, right of, above, below and i the '
     'index of an earlier include clause'),
    ({"exclude": [{"count": 2}]}, 'metadata exclude[0] ({"count": 2}) lacks "class"'),
    ({"tag": 3}, 'metadata "tag" is 3, not a string'),
])
def test_malformed_include_or_exclude(folder, tmp_path, capsys, change, problem):
    meta_file(folder).write_text(json.dumps({**RECORD, **change}) + "\n")
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{meta_file(folder)}: {problem}"), message


def test_metadata_without_prompt_fails_in_the_layout_and_in_rewards_score(folder, capsys):
    meta_file(folder).write_text('{"tag": "counting"}\n')
    with pytest.raises(ValueError, match='metadata lacks "prompt"'):
        list(iter_images(folder))
    message = cli_error(capsys, ["rewards", "score", "--reward", "brightness", "--images", str(folder)])
    assert message.startswith(f"{meta_file(folder)}: metadata lacks \"prompt\" (the prompt text")


def test_classes_the_shapes_detector_cannot_detect(folder, tmp_path, capsys):
    meta_file(folder).write_text(json.dumps(
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}))
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{meta_file(folder)}: metadata asks for 'cat', which the shapes detector "
                                  "cannot detect (its classes: circle, square, triangle, star)")


# 2. metadata.jsonl that is not one JSON object.

@pytest.mark.parametrize("text, line, kind", [("[1, 2]", 1, "array"), ('"str"', 1, "string"), ("42", 1, "number"),
                                              ("\n\n[1, 2]\n", 3, "array")])
def test_non_object_json_names_file_and_line(folder, tmp_path, capsys, text, line, kind):
    meta_file(folder).write_text(text)
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{meta_file(folder)}:{line}: a JSON {kind} (")
        assert "not an object" in message


def test_second_line_and_invalid_json_name_file_and_line(folder, tmp_path, capsys):
    meta_file(folder).write_text(json.dumps(RECORD) + "\n[1, 2]\n")
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{meta_file(folder)}:2: more data after the metadata object; GenEval's layout "
                                  "has exactly one JSON object per metadata.jsonl")
    meta_file(folder).write_text('{"tag": "position",\n "prompt" "x"}\n')
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{meta_file(folder)}:2: not valid JSON (Expecting ':' delimiter, column 11)")


def test_pretty_printed_metadata_is_read_like_genevals_json_load(folder):
    meta_file(folder).write_text("\ufeff" + json.dumps(RECORD, indent=2) + "\n\n")
    assert [m for _, m, _ in iter_images(folder)] == [RECORD, RECORD]


# 3. missing or unreadable images.

def test_samples_folder_missing(folder, tmp_path, capsys):
    shutil.rmtree(folder / "00000" / "samples")
    for message in (score_error(folder, FileNotFoundError), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{folder / '00000' / 'samples'}: missing; GenEval's layout keeps each prompt's "
                                  "images in 00000/samples/0000.png, 0001.png, ...")


def test_samples_folder_empty_or_without_png(folder, tmp_path, capsys):
    for j in (0, 1):
        sample(folder, j).unlink()
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{folder / '00000' / 'samples'}: no .png images (it is empty);")
    image().save(folder / "00000" / "samples" / "0000.jpg")
    assert "(it holds 0000.jpg but no .png)" in score_error(folder)


def test_corrupt_png_names_the_file(folder, tmp_path, capsys):
    sample(folder, 1).write_bytes(np.random.default_rng(0).bytes(300))
    expected = f"{sample(folder, 1)}: cannot be read as an image (not an image format PIL recognises);"
    with pytest.raises(ValueError) as info:
        load_image(sample(folder, 1))
    assert str(info.value).startswith(expected)
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(expected)
    message = cli_error(capsys, ["rewards", "score", "--reward", "brightness", "--images", str(folder)])
    assert message.startswith(expected)


def test_truncated_png_names_the_file(folder, tmp_path, capsys):
    data = sample(folder, 0).read_bytes()
    sample(folder, 0).write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{sample(folder, 0)}: cannot be read as an image (image file is truncated")


def test_missing_loose_image_file(tmp_path, capsys):
    message = cli_error(capsys, ["rewards", "score", "--reward", "brightness", "--images",
                                 str(tmp_path / "nope.png"), "--prompts", "x"])
    assert message == f"{tmp_path / 'nope.png'}: no such image file"


# 4. image sizes for the shapes detector (64x64): square ones are resized with a notice, others refused.

def test_square_images_of_another_size_are_resized_with_one_notice(folder, tmp_path, capsys):
    for j in (0, 1):
        image(j).resize((128, 128), Image.Resampling.NEAREST).save(sample(folder, j))
    capsys.readouterr()
    rows = geneval.score_folder(folder, geneval.get_backend("shapes"), progress=False)
    err = capsys.readouterr().err
    assert err.strip() == ("note: resizing 2 images from 128x128 to 64x64 for the shapes detector, which works at "
                           "64x64 (box filter; boxes in the results stay in the images' own pixels)")
    assert all(r["correct"] for r in rows)
    write_prompt(tmp_path / "ref", 0, RECORD, [image(0)])
    reference = geneval.score_folder(tmp_path / "ref", geneval.get_backend("shapes"), progress=False)[0]
    boxes, ref = json.loads(rows[0]["details"]), json.loads(reference["details"])
    for cls in ref:  # the same objects, boxes in 128-pixel coordinates
        assert np.allclose(np.array(boxes[cls])[:, :4], 2 * np.array(ref[cls])[:, :4])
    assert main(["eval", "geneval", "--images", str(folder), "--out", str(tmp_path / "r.jsonl")]) == 0
    assert capsys.readouterr().err.count("note: resizing 2 images from 128x128 to 64x64") == 1


def test_detector_announces_a_resize_once_per_size(capsys):
    detector = ShapesDetector()
    for _ in range(3):
        detector.detect(image().resize((256, 256)))
    assert capsys.readouterr().err.count("note: resizing 256x256 images to 64x64 for the shapes detector") == 1


def test_non_square_image_is_refused_not_squashed(folder, tmp_path, capsys):
    Image.new("RGB", (200, 64), (128, 128, 128)).save(sample(folder, 1))
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message == (f"{sample(folder, 1)}: image is 200x64, not square; the shapes detector works on 64x64 "
                           "images and will not squash a non-square one: crop or resize the images to square "
                           "(e.g. 64x64) and score again")
    with pytest.raises(ValueError, match="a 200x64 image: the shapes detector .* will not squash"):
        ShapesDetector().detect(Image.new("RGB", (200, 64)))


def test_a_backend_without_image_size_takes_any_size(folder):
    """The hf backend (Mask2Former) declares no image_size: its processor resizes keeping the aspect
    ratio and post-processing maps masks back to each image's own size, so nothing is checked."""
    from eval.hf_backend import HFDetector

    assert getattr(HFDetector, "image_size", None) is None
    Image.new("RGB", (200, 64)).save(sample(folder, 1))

    class AnySize:
        name = "any"

        def detect(self, image):
            return {}

        def classify_colors(self, image, detections, classname):
            return []

    assert not geneval.check_image_sizes([sample(folder, 0), sample(folder, 1)], AnySize())
    assert len(geneval.score_folder(folder, AnySize(), progress=False)) == 2


# 5. rewards score on images of mixed sizes: refused before the reward is built.

def test_rewards_score_mixed_sizes(tmp_path, capsys):
    files = []
    for j in range(3):
        files.append(tmp_path / f"a{j}.png")
        image(j).save(files[-1])
    image().resize((128, 128)).save(tmp_path / "b.png")
    args = ["rewards", "score", "--images", *map(str, files), str(tmp_path / "b.png"), "--prompts", "x"]
    # An unknown reward would fail too: the size check comes first, before any reward is built.
    message = cli_error(capsys, [*args, "--reward", "no_such_reward"])
    assert message == (f"--images have different sizes: 64x64 (3 files), 128x128 (1 file: {tmp_path / 'b.png'}); "
                       "a reward scores its images as one batch of one size: score each size separately (one "
                       "`diffrl rewards score` per size) or resize the images to one size first")
    assert main(["rewards", "score", "--reward", "brightness", "--images", *map(str, files), "--prompts", "x"]) == 0


# 6. empty metadata.jsonl, numbered folder without metadata.jsonl.

def test_empty_metadata_file(folder, tmp_path, capsys):
    meta_file(folder).write_text("\n  \n")
    for message in (score_error(folder), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{meta_file(folder)}: empty; it must hold the prompt's metadata as one JSON "
                                  "object, e.g. {")


def test_numbered_folder_without_metadata(folder, tmp_path, capsys):
    (folder / "00001" / "samples").mkdir(parents=True)
    image().save(folder / "00001" / "samples" / "0000.png")
    for message in (score_error(folder, FileNotFoundError), geneval_error(capsys, folder, tmp_path)):
        assert message.startswith(f"{folder / '00001' / 'metadata.jsonl'}: missing; each numbered prompt folder "
                                  "of GenEval's layout needs one")
