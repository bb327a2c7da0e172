"""The shipped shapes-world CLIP (``assets/shapes-clip``), loaded by its short name through the CLIP
rewards' own loading code. Expected PickScores are computed here from the transformers model directly.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from eval.shapes import grammar, render
from finetune.models import hub
from rewards.base import build_reward
from rewards.clip_common import pooled

os.environ["HF_HUB_OFFLINE"] = "1"

FOLDER = hub.ASSETS / "shapes-clip"
SEED = 5_000_000  # neither the training seeds nor those of the script's final evaluation
TOP1_THRESHOLD = 0.80  # the shipped model gets 0.871 here (2 renders x 62 prompts), 0.849 on the script's 8 x 62


def renders(records, per_record, seed=SEED):
    images = [render.render(r, seed + 1000 * i + k)[0] for i, r in enumerate(records) for k in range(per_record)]
    array = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2), [i for i in range(len(records)) for _ in range(per_record)]


@pytest.fixture(scope="module")
def pickscore():
    return build_reward({"name": "pickscore", "model": "shapes-clip", "processor": "shapes-clip", "batch_size": 64})


def test_short_name_resolves_to_the_shipped_folder(pickscore):
    assert pickscore.model_source == pickscore.processor_source == str(FOLDER)
    for name in ("pickscore", "clipscore"):  # it brings its own processor: PickScore's default hub one cannot fit it
        assert build_reward({"name": name, "model": "shapes-clip"}).processor_source == str(FOLDER)
    weights = [f for f in FOLDER.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert [f.name for f in weights] == ["model.safetensors"]
    assert sum(f.stat().st_size for f in FOLDER.rglob("*")) <= 10 * 2**20


def test_missing_shipped_clip_says_how_to_rebuild_it(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "ASSETS", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_shapes_clip.py"):
        build_reward({"name": "pickscore", "model": "shapes-clip", "processor": "shapes-clip"})


def test_ranks_the_matching_eval_prompt_first(pickscore):
    records = grammar.split("eval")
    images, owner = renders(records, 2)
    pickscore(images[:1], [records[0]["prompt"]], records[:1])  # loads the model
    with torch.inference_mode():
        sims = pickscore.image_embeds(images) @ pickscore.text_embeds([r["prompt"] for r in records]).T
    accuracy = (sims.argmax(1) == torch.tensor(owner)).float().mean().item()
    assert accuracy >= TOP1_THRESHOLD, accuracy


def test_pickscore_is_scaled_cosine_of_the_clip_features(pickscore):
    from transformers import CLIPModel, CLIPProcessor

    records = grammar.split("eval")[::7]
    images, owner = renders(records, 1)
    prompts = [records[i]["prompt"] for i in owner]
    out = pickscore(images, prompts, [records[i] for i in owner])

    model, processor = CLIPModel.from_pretrained(FOLDER).eval(), CLIPProcessor.from_pretrained(FOLDER)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    with torch.no_grad():
        image = pooled(model.get_image_features(**processor(images=pil, return_tensors="pt")))
        text = pooled(model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")))
        cos = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
        expected = model.logit_scale.exp().float() * cos
    torch.testing.assert_close(out.info["pickscore_cos"], cos, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_matching_prompt_scores_higher_than_a_mismatched_one(name, pickscore):
    reward = pickscore if name == "pickscore" else build_reward({"name": "clipscore", "model": "shapes-clip"})
    records = grammar.split("eval")
    images, owner = renders(records, 1, seed=SEED + 1)
    matched = [records[i]["prompt"] for i in owner]
    mismatched = [records[(i + 17) % len(records)]["prompt"] for i in owner]
    good = reward(images, matched, [{}] * len(owner)).scores
    bad = reward(images, mismatched, [{}] * len(owner)).scores
    assert good.mean() > bad.mean() and (good > bad).float().mean() >= 0.8
