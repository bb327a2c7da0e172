"""The transformers/open_clip GenEval backend on tiny random models (nothing downloaded)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from eval import geneval
from eval.hf_backend import (
    CROP_BACKGROUND, HFDetector, _drop_padding, color_prompts, detections_from_segments,
    geneval_classnames, masked_crop, to_geneval_name)
from eval.shapes.grammar import read_jsonl

# GenEval name -> the spelling the tiny detector's id2label uses (COCO / Pascal-VOC variants).
RENAMED = {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa",
           "computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard",
           "hair drier": "hair dryer", "dining table": "diningtable"}
UNKNOWN = "toothbrush"  # replaced by a label GenEval does not know


def tiny_labels():
    names = [RENAMED.get(n, n) for n in geneval_classnames()]
    names[names.index(UNKNOWN)] = "frobnicator"
    return dict(enumerate(names))


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              Mask2FormerImageProcessor, SwinConfig)

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    labels = tiny_labels()
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, dim_feedforward=64, num_queries=6,
                               num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    model = Mask2FormerForUniversalSegmentation(config).eval()
    # Make every query say "motorbike" confidently, so detections of a known label are guaranteed.
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[config.label2id["motorbike"]] = 8.0
    path = tmp_path_factory.mktemp("mask2former")
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    return model, preprocess, open_clip.get_tokenizer("ViT-L-14")  # the BPE shipped with open_clip


@pytest.fixture(scope="module")
def backend(detector_dir, tiny_clip):
    return HFDetector(detector=str(detector_dir), device="cpu", clip=tiny_clip)


def photo(w=64, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_label_names_map_to_geneval():
    known = set(geneval_classnames())
    assert len(known) == 80
    for geneval_name, hf_name in RENAMED.items():
        assert to_geneval_name(hf_name, known) == geneval_name
    assert to_geneval_name("Traffic_Light", known) == "traffic light"
    assert to_geneval_name("frobnicator", known) is None


def test_segments_become_detections_with_mask_boxes():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    segments = [{"label_id": 0, "score": 0.05}, {"label_id": 1, "score": 0.9}, {"label_id": 2, "score": 0.8}]
    found = detections_from_segments(segments, [mask, mask, mask], {0: "motorbike", 1: "sofa", 2: "frobnicator"},
                                     set(geneval_classnames()))
    assert set(found) == {"motorcycle", "couch"}  # unknown label dropped
    (det,) = found["motorcycle"]
    assert det.box == [3.0, 2.0, 9.0, 5.0] and det.score == pytest.approx(0.05)
    assert det.mask.dtype == bool and det.mask.sum() == 18


def test_color_prompts_match_geneval():
    prompts = color_prompts("dog")
    assert geneval.COLORS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                              "white")
    assert len(prompts) == 10
    assert prompts[0] == ["a photo of a red dog", "a photo of a red-colored dog", "a photo of a red object"]
    assert prompts[-1] == ["a photo of a white dog", "a photo of a white-colored dog", "a photo of a white object"]


def test_masked_crop_greys_outside_mask():
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200  # a red image
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:5] = True
    mask[1, 2] = False  # a hole inside the box must turn grey too
    crop = np.asarray(masked_crop(Image.fromarray(rgb), [2, 1, 6, 5], mask))
    assert crop.shape == (4, 4, 3)
    assert (crop[0, 1] == (200, 0, 0)).all()
    for y, x in [(0, 0), (3, 0), (0, 3), (3, 3)]:
        assert tuple(crop[y, x]) == CROP_BACKGROUND == (153, 153, 153)


def test_detect_keeps_low_scores_and_maps_labels(backend):
    image = photo()
    raw = backend.detect(image)
    assert set(raw) == {"motorcycle"}
    dets = raw["motorcycle"]
    assert dets and all(d.mask.shape == (48, 64) and d.mask.dtype == bool for d in dets)
    for d in dets:
        assert d.box == [float(v) for v in geneval_mask_extent(d.mask)]
    # Thresholds are the scorer's: lowering a detection's score makes select_detections drop it.
    dets[0].score = 0.3
    kept = geneval.select_detections(raw, "colors").get("motorcycle", [])
    assert dets[0] not in kept and all(d.score > 0.3 for d in kept)


def geneval_mask_extent(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_known_classes(backend):
    known = backend.known_classes
    assert len(known) == 79 and "motorcycle" in known and UNKNOWN not in known
    backend.check_classes(["motorcycle", "dog"])
    with pytest.raises(ValueError, match=UNKNOWN):
        backend.check_classes([UNKNOWN])


def test_drop_padding_cuts_mask_logits():
    outputs = SimpleNamespace(masks_queries_logits=torch.zeros(1, 3, 24, 24))
    pixel_mask = torch.zeros(1, 96, 96, dtype=torch.long)
    pixel_mask[:, :64, :48] = 1
    _drop_padding(outputs, pixel_mask)
    assert outputs.masks_queries_logits.shape == (1, 3, 16, 12)


class OneHotClip:
    """A stand-in CLIP whose embeddings are one-hot colour indices (see ``dominant_color``)."""

    def encode_image(self, idx):
        return torch.nn.functional.one_hot(idx, len(geneval.COLORS)).float()

    encode_text = encode_image


def dominant_color(crop):
    """Preprocess stand-in: the crop's mean pixel -> index of red, green or blue in COLORS."""
    channel = int(np.asarray(crop, float).mean((0, 1)).argmax())
    return torch.tensor(geneval.COLORS.index(("red", "green", "blue")[channel]))


def color_tokens(texts):
    """Tokenizer stand-in: each prompt -> the index of its colour ("a photo of a {c}...")."""
    return torch.tensor([geneval.COLORS.index(t.split()[4].split("-")[0]) for t in texts])


def test_classify_colors_uses_masked_crops_and_color_order():
    rgb = np.full((20, 20, 3), 30, np.uint8)
    rgb[2:8, 2:8] = (250, 10, 10)
    rgb[10:18, 10:18] = (10, 10, 250)
    red, blue = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    red[2:8, 2:8] = True
    blue[10:18, 10:18] = True
    fake = HFDetector(detector="unused", device="cpu", clip=(OneHotClip(), dominant_color, color_tokens))
    # The red object's box is the whole image: unmasked, the larger blue square would dominate it.
    dets = [geneval.Detection([10, 10, 18, 18], 0.9, blue), geneval.Detection([0, 0, 20, 20], 0.9, red)]
    assert fake.classify_colors(Image.fromarray(rgb), dets, "dog") == ["blue", "red"]
    assert fake.classify_colors(Image.fromarray(rgb), [], "dog") == []


def test_evaluate_image_end_to_end(backend):
    metadata = next(m for m in read_jsonl(geneval.GENEVAL_METADATA)
                    if m["tag"] == "colors" and m["include"][0]["class"] == "motorcycle")
    image = photo(seed=1)
    row = geneval.evaluate_image(backend, image, metadata, "x.png")
    assert list(row) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert row["filename"] == "x.png" and json.loads(row["metadata"]) == metadata
    details = json.loads(row["details"])
    assert list(details) == ["motorcycle"]  # the tiny detector is confident enough to pass 0.3
    # The colour clause was judged by the real (tiny) open_clip model, on the most confident object.
    best = geneval.select_detections(backend.detect(image), "colors")["motorcycle"][:1]
    (color,) = backend.classify_colors(image, best, "motorcycle")
    assert color in geneval.COLORS
    assert row["correct"] is (color == metadata["include"][0]["color"])


def test_get_backend_knows_hf():
    assert isinstance(geneval.get_backend("hf"), HFDetector)


def test_missing_local_paths_raise_clear_oserror(tmp_path, detector_dir):
    with pytest.raises(OSError, match=r"detector=.*local path"):
        HFDetector(detector=str(tmp_path / "missing"), device="cpu").detect(photo())
    with pytest.raises(OSError, match=r"detector=.*local path"):
        HFDetector(detector="facebook/not-a-cached-model", device="cpu").detect(photo())
    clipless = HFDetector(detector=str(detector_dir), clip_pretrained=str(tmp_path / "missing.pt"), device="cpu")
    det = geneval.Detection([0, 0, 4, 4], 0.9, None)
    with pytest.raises(OSError, match=r"clip_pretrained=.*local path"):
        clipless.classify_colors(photo(), [det], "dog")
