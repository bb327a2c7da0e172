"""GenEval detector backend for real photos (``--backend hf``), built on transformers + open_clip.

What it does, following GenEval's ``evaluate_images.py``:

* objects: Mask2Former (Swin-S, COCO instance segmentation) gives per-query masks and scores; each
  kept segment becomes a :class:`~eval.geneval.Detection` with its binary mask, the mask's extent as
  box ``[x1, y1, x2, y2]`` (exclusive right/bottom edge) and the segment score. No threshold is
  applied here by default: ``eval.geneval.select_detections`` applies GenEval's 0.3 / 0.9.
* colour: each object is pasted onto a #999999 grey canvas through its mask, cropped to its box
  and classified zero-shot by CLIP ViT-L-14 (OpenAI weights) among the ten GenEval colours, with
  the three GenEval templates averaged per colour.

How it differs from the official pipeline (which runs mmdetection 2.x):

* the detector is transformers' port of Mask2Former (``facebook/mask2former-swin-small-coco-instance``
  by default), not mmdetection's checkpoint of the same architecture; the weights come from a
  different training run and conversion, so scores and masks are not identical;
* pre- and post-processing are transformers', not mmdetection's: the input resizing follows the
  checkpoint's ``preprocessor_config.json``, and ``post_process_instance_segmentation`` resamples
  the mask logits through a fixed 384x384 grid, binarises them there and resizes the binary masks
  to the image with nearest-neighbour interpolation (mmdetection resizes the logits to the image
  first); segments with an empty mask are dropped;
* label names are transformers' ``id2label`` mapped onto GenEval's ``object_names.txt`` by name
  (``LABEL_ALIASES``), where GenEval maps mmdetection's class indices;
* open_clip 3.x builds ``ViT-L-14`` with plain GELU unless told otherwise; OpenAI's weights were
  trained with QuickGELU (older open_clip, as GenEval used, switched it on for ``pretrained="openai"``),
  so for a known tag the tag's activation is forced here. With a local checkpoint of the OpenAI
  weights pass ``clip_model="ViT-L-14-quickgelu"``.

Consequently scores from this backend are close to, but not guaranteed equal to, official GenEval
numbers; report them as "GenEval rules, transformers Mask2Former".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from eval.geneval import COLORS, Detection

OBJECT_NAMES = Path(__file__).parent / "data" / "geneval" / "object_names.txt"
CROP_BACKGROUND = (153, 153, 153)  # GenEval's "#999"
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")

# Label spellings found in COCO-trained checkpoints (COCO's own names, Pascal-VOC style names,
# common variants) -> GenEval's object_names.txt. Names already equal to GenEval's need no entry.
LABEL_ALIASES = {
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "hair dryer": "hair drier",
    "cellphone": "cell phone",
    "mobile phone": "cell phone",
    "doughnut": "donut",
    "hotdog": "hot dog",
    "teddybear": "teddy bear",
}


def geneval_classnames() -> list[str]:
    """GenEval's 80 detector class names, in its order."""
    return [line.strip() for line in OBJECT_NAMES.read_text().splitlines() if line.strip()]


def to_geneval_name(label: str, known: set[str]) -> str | None:
    """GenEval's name for a detector label, or None if GenEval has no such class."""
    name = " ".join(label.strip().lower().replace("_", " ").split())
    name = LABEL_ALIASES.get(name, name)
    return name if name in known else None


def color_prompts(classname: str) -> list[list[str]]:
    """Per colour (in ``COLORS`` order), the GenEval prompts describing ``classname`` in it."""
    return [[t.format(c=color, obj=classname) for t in COLOR_TEMPLATES] for color in COLORS]


def mask_box(mask: np.ndarray) -> list[float]:
    """[x1, y1, x2, y2] of a non-empty binary mask, right/bottom edges exclusive."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def masked_crop(image: Image.Image, box: Sequence[float], mask: np.ndarray | None) -> Image.Image:
    """The object as GenEval's colour classifier sees it: grey outside its mask, cropped to its box."""
    rgb = np.array(image.convert("RGB"))
    if mask is not None:
        rgb[~np.asarray(mask, dtype=bool)] = CROP_BACKGROUND
    x1, y1, x2, y2 = (int(round(v)) for v in box[:4])
    return Image.fromarray(rgb).crop((x1, y1, x2, y2))


def detections_from_segments(segments: list[dict], masks, id2label: dict,
                             known: set[str]) -> dict[str, list[Detection]]:
    """Turn transformers' ``segments_info`` + binary maps into GenEval detections per class.

    ``masks[i]`` is the binary map of ``segments[i]`` (``return_binary_maps=True`` keeps that order).
    """
    found: dict[str, list[Detection]] = {}
    for segment, mask in zip(segments, masks):
        name = to_geneval_name(id2label[segment["label_id"]], known)
        mask = np.asarray(mask, dtype=bool)
        if name is None or not mask.any():
            continue
        found.setdefault(name, []).append(Detection(mask_box(mask), float(segment["score"]), mask))
    return found


class HFDetector:
    """GenEval backend: transformers Mask2Former for objects, open_clip CLIP for colours.

    ``detector`` and ``clip_pretrained`` may be hub ids / open_clip tags or local paths; nothing is
    loaded before first use. ``clip`` injects a ready ``(model, preprocess, tokenizer)`` triple
    instead of loading one (tests, or to share a CLIP model with a reward).
    """

    name = "hf"

    def __init__(self, detector: str = "facebook/mask2former-swin-small-coco-instance",
                 clip_model: str = "ViT-L-14", clip_pretrained: str = "openai", device=None,
                 detector_threshold: float = 0.0, clip=None):
        self.detector = str(detector)
        self.clip_model = clip_model
        self.clip_pretrained = str(clip_pretrained)
        self.detector_threshold = detector_threshold
        self._device = device
        self._detector = None  # (processor, model)
        self._clip = clip
        self._text_features: dict = {}  # classname -> (embed_dim, len(COLORS)) tensor
        self._geneval_names = set(geneval_classnames())

    @property
    def device(self):
        import torch

        if self._device is None:
            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(self._device)

    # -- loading ---------------------------------------------------------------------------------

    def _load_detector(self):
        if self._detector is None:
            from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

            try:
                processor = AutoImageProcessor.from_pretrained(self.detector)
                model = Mask2FormerForUniversalSegmentation.from_pretrained(self.detector)
            except (OSError, ValueError) as err:  # offline cache miss, bad path, invalid repo id
                raise OSError(
                    f"could not load the Mask2Former detector detector={self.detector!r} ({err}); "
                    "without network access pass a local path to a saved checkpoint "
                    "(a folder with config.json, the weights and preprocessor_config.json)") from err
            self._detector = (processor, model.to(self.device).eval())
        return self._detector

    def _load_clip(self):
        if self._clip is None:
            import open_clip

            # A known tag carries the activation its weights were trained with (QuickGELU for
            # OpenAI's); open_clip 3.x would otherwise build ViT-L-14 with plain GELU.
            tag_cfg = open_clip.get_pretrained_cfg(self.clip_model, self.clip_pretrained)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    self.clip_model, pretrained=self.clip_pretrained, device=self.device,
                    force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
            except (OSError, RuntimeError, ValueError) as err:
                raise OSError(
                    f"could not load CLIP clip_model={self.clip_model!r} with "
                    f"clip_pretrained={self.clip_pretrained!r} ({err}); without network access pass "
                    "clip_pretrained as a local path to the checkpoint file") from err
            self._clip = (model.eval(), preprocess, open_clip.get_tokenizer(self.clip_model))
        return self._clip

    # -- classes ---------------------------------------------------------------------------------

    @property
    def known_classes(self) -> set[str]:
        """The GenEval class names this detector's labels map to."""
        id2label = self._load_detector()[1].config.id2label
        return {n for n in (to_geneval_name(l, self._geneval_names) for l in id2label.values()) if n}

    def check_classes(self, names) -> None:
        """Raise ValueError if metadata asks for classes this detector cannot produce."""
        missing = sorted(set(names) - self.known_classes)
        if missing:
            raise ValueError(f"detector {self.detector!r} cannot detect GenEval classes {missing}; "
                             "its labels do not map to them (see eval.hf_backend.LABEL_ALIASES)")

    # -- backend protocol ------------------------------------------------------------------------

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        import torch

        processor, model = self._load_detector()
        image = image.convert("RGB")
        inputs = processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = model(**inputs)
        _drop_padding(outputs, inputs.get("pixel_mask"))
        result = processor.post_process_instance_segmentation(
            outputs, threshold=self.detector_threshold, target_sizes=[(image.height, image.width)],
            return_binary_maps=True)[0]
        segments = result["segments_info"]
        masks = result["segmentation"].bool().cpu().numpy() if segments else []
        return detections_from_segments(segments, masks, model.config.id2label, self._geneval_names)

    def color_text_features(self, classname: str):
        """(embed_dim, len(COLORS)) unit columns: each colour's template embeddings, averaged."""
        import torch
        import torch.nn.functional as F

        if classname not in self._text_features:
            model, _, tokenizer = self._load_clip()
            prompts = color_prompts(classname)
            with torch.no_grad():
                tokens = tokenizer([p for per_color in prompts for p in per_color]).to(self.device)
                emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
            emb = emb.reshape(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._text_features[classname] = F.normalize(emb, dim=-1).T
        return self._text_features[classname]

    def classify_colors(self, image, detections: list[Detection], classname: str) -> list[str]:
        import torch
        import torch.nn.functional as F

        if not detections:
            return []
        model, preprocess, _ = self._load_clip()
        text = self.color_text_features(classname)
        crops = [preprocess(masked_crop(image, d.box, d.mask)) for d in detections]
        with torch.no_grad():
            feats = F.normalize(model.encode_image(torch.stack(crops).to(self.device)).float(), dim=-1)
        return [COLORS[i] for i in (feats @ text).argmax(1).tolist()]


def _drop_padding(outputs, pixel_mask) -> None:
    """Cut the mask logits to the unpadded image area.

    transformers' instance post-processing resizes the logits of the whole (padded) input to the
    target size, which would stretch objects when the processor padded the image.
    """
    if pixel_mask is None:
        return
    logits = outputs.masks_queries_logits
    padded_h, padded_w = pixel_mask.shape[-2:]
    valid_h = int(pixel_mask[0].any(1).sum())
    valid_w = int(pixel_mask[0].any(0).sum())
    if (valid_h, valid_w) == (padded_h, padded_w):
        return
    h = max(1, round(logits.shape[-2] * valid_h / padded_h))
    w = max(1, round(logits.shape[-1] * valid_w / padded_w))
    outputs.masks_queries_logits = logits[..., :h, :w]
