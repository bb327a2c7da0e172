"""The `ocr` reward (after Flow-GRPO's flow_grpo/ocr.py): the edit distance and reward formula against
a separately written computation, target extraction, and the plumbing on a tiny random TrOCR-style
VisionEncoderDecoderModel saved to a folder and loaded back by the reward.
"""

import json
import os
import random
from functools import lru_cache

import pytest
import torch

from rewards.base import build_reward
from rewards.ocr import levenshtein, ocr_distance, target_text

os.environ["HF_HUB_OFFLINE"] = "1"


def edit_distance(a, b):
    """Recursive definition, memoised: a different route to the same number."""
    @lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def expected_reward(recognised, target):
    """Flow-GRPO's OcrScorer.__call__ body, spelled out again."""
    r, t = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    dist = 0 if t in r else edit_distance(r, t)
    return 1 - min(dist, len(t)) / len(t)


def test_levenshtein_matches_recursive_definition():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choices("abc", k=rng.randint(0, 7)))
        b = "".join(rng.choices("abc", k=rng.randint(0, 7)))
        assert levenshtein(a, b) == edit_distance(a, b), (a, b)


@pytest.mark.parametrize("recognised, target, reward", [
    ("hello", "hello", 1.0),               # identical
    ("Hallo", "hello", 0.8),               # one substitution
    ("helllo", "hello", 0.8),              # one insertion
    ("helo", "hello", 0.8),                # one deletion
    ("", "hello", 0.0),                    # nothing recognised
    ("HELLO  WORLD", "Hello World", 1.0),  # case and spaces do not count
    ("NewYork", "new york", 1.0),
    ("say hello there", "hello", 1.0),     # the target inside a longer reading: distance 0
    ("xyzxyzxyzxyz", "cat", 0.0),          # distance 12 clamped to len("cat")
    ("cot", "cat", 2 / 3),
    ("new\tyork", "new york", 1 - 1 / 7),  # only spaces are removed, as in Flow-GRPO
])
def test_reward_formula(recognised, target, reward):
    assert 1 - ocr_distance(recognised, target) == pytest.approx(reward)
    assert 1 - ocr_distance(recognised, target) == pytest.approx(expected_reward(recognised, target))


def test_target_from_prompt_and_metadata():
    assert target_text('A neon sign that says "Open Late" above a door') == "Open Late"
    assert target_text('"Hello" and "World"') == "Hello"  # the first quoted part
    assert target_text('a sign that says "x"', {"text": "Sale"}) == "Sale"  # metadata wins
    assert target_text("a shop sign", {"text": "Sale"}) == "Sale"
    assert target_text('a sign "abc"', {"text": None}) == "abc"
    for prompt in ["a shop sign with no quotes", 'an unclosed "quote', 'empty "" quotes', 'blank "   " quotes']:
        with pytest.raises(ValueError, match="target text") as error:
            target_text(prompt, {})
        assert repr(prompt) in str(error.value)


def test_missing_target_fails_before_loading():
    reward = build_reward({"name": "ocr", "model": "diffrl-test/no-such-ocr-model"})
    assert not hasattr(reward, "model")
    with pytest.raises(ValueError, match="no target text in prompt 'a plain prompt'"):
        reward(torch.rand(2, 3, 16, 16), ['a "ok" sign', "a plain prompt"], [{}, {}])
    with pytest.raises(OSError, match="pass a local path"):  # offline, the hub id fails with a way out
        reward(torch.rand(1, 3, 16, 16), ['a "ok" sign'], [{}])


@pytest.fixture(scope="module")
def ocr_dir(tmp_path_factory):
    """A tiny ViT encoder + TrOCR decoder and a TrOCRProcessor (ViT image processor + a byte-level
    RoBERTa tokenizer with one token per printable character), saved with save_pretrained."""
    from transformers import (RobertaTokenizer, TrOCRConfig, TrOCRProcessor, ViTConfig, ViTImageProcessor,
                              VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

    folder = tmp_path_factory.mktemp("tiny_ocr")
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ"]  # Ġ: space
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8)
    decoder = TrOCRConfig(vocab_size=len(tokenizer), d_model=32, decoder_layers=1, decoder_attention_heads=2,
                          decoder_ffn_dim=64, max_position_embeddings=64, bos_token_id=0, pad_token_id=1,
                          eos_token_id=2, decoder_start_token_id=2)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 1, 2  # as TrOCR's released models
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config)
    model.generation_config.suppress_tokens = [2]  # a random model would stop at once; make it read something
    model.save_pretrained(folder)
    TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return folder


PROMPTS = ['a sign that says "Hello World"', 'a cake with "Happy 30" on it', 'a poster, the title "GRPO"']


def test_tiny_model_plumbing(ocr_dir):
    from transformers import AutoProcessor, VisionEncoderDecoderModel

    from rewards.base import to_pil

    batch = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    reward = build_reward({"name": "ocr", "model": str(ocr_dir), "batch_size": 2, "max_new_tokens": 6,
                           "device": "cpu"})
    out = reward(batch, PROMPTS, [{}] * 3)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all() and ((out.scores >= 0) & (out.scores <= 1)).all()
    torch.testing.assert_close(out.info["ocr_distance"], 1 - out.scores)

    # The same readings straight from the model, scored with the formula written here.
    model, processor = VisionEncoderDecoderModel.from_pretrained(ocr_dir).eval(), AutoProcessor.from_pretrained(ocr_dir)
    with torch.no_grad():
        pixels = processor(images=to_pil(batch), return_tensors="pt")["pixel_values"]
        ids = model.generate(pixels, max_new_tokens=6, do_sample=False, num_beams=1)
    readings = processor.batch_decode(ids, skip_special_tokens=True)
    assert any(readings) and all(len(r) <= 6 for r in readings)
    assert reward.recognise(batch) == readings
    targets = ["Hello World", "Happy 30", "GRPO"]
    torch.testing.assert_close(out.scores, torch.tensor([expected_reward(r, t) for r, t in zip(readings, targets)]))


def test_scores_follow_formula_on_chosen_readings(ocr_dir, monkeypatch):
    reward = build_reward({"name": "ocr", "model": str(ocr_dir), "batch_size": 2, "device": "cpu"})
    readings = iter(["HELLO WORLD", "hapy 3O", "", "Sale now"])
    monkeypatch.setattr(reward, "recognise", lambda images: [next(readings) for _ in images])
    prompts = PROMPTS + ["a shop window"]
    out = reward(torch.rand(4, 3, 16, 16), prompts, [{}, {}, {}, {"text": "SALE"}])
    expected = torch.tensor([1.0, 1 - 2 / 7, 0.0, 1.0])  # hand-computed; "Sale now" contains "sale"
    torch.testing.assert_close(out.scores, expected)
    torch.testing.assert_close(out.info["ocr_distance"], 1 - expected)
