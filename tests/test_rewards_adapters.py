"""The model-based reward adapters, on tiny models built from configs and loaded back through the
adapters' own loading code from local folders. Every expected score is computed here by calling the
model directly and applying the published formula by hand, not through the adapter.

HPS runs on a tiny open_clip model when open-clip-torch is installed (it is optional), and always on
a monkeypatched model builder; ImageReward only on a fake model (its package and weights cannot be
installed offline).
"""

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rewards.base import build_reward

os.environ["HF_HUB_OFFLINE"] = "1"

PROMPTS = ["a photo of a red circle", "two blue squares", "a green star above a yellow triangle"]


def images(n=3, h=40, w=48, seed=0):
    # Not square and not the model's size, so that resizing and cropping are exercised.
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def pil_images(batch):
    array = (batch.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel + CLIPProcessor saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from finetune.models.tiny import write_tokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = write_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24, logit_scale_init_value=2.3)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def reference_clip(folder, batch, prompts):
    """(cos, exp(logit_scale)) of each image-prompt pair, straight from the transformers model."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor.image_processor(pil_images(batch), return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        return F.cosine_similarity(image, text, dim=-1), model.logit_scale.exp()


def test_pickscore_matches_formula(clip_dir):
    batch = images()
    reward = build_reward({"name": "pickscore", "model": str(clip_dir), "processor": str(clip_dir), "batch_size": 2})
    out = reward(batch, PROMPTS, [{}] * 3)
    cos, logit_scale = reference_clip(clip_dir, batch, PROMPTS)
    assert abs(float(logit_scale) - np.exp(2.3)) < 1e-4
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, logit_scale * cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.info["pickscore_cos"], cos, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [2.5, 100.0])
def test_clipscore_matches_formula(clip_dir, scale):
    batch = images(seed=1)
    reward = build_reward({"name": "clipscore", "model": str(clip_dir), "scale": scale, "batch_size": 2})
    out = reward(batch, PROMPTS, [{}] * 3)
    cos, _ = reference_clip(clip_dir, batch, PROMPTS)
    torch.testing.assert_close(out.scores, scale * torch.clamp(cos, min=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.info["clip_cos"], cos, atol=1e-6, rtol=1e-5)


def test_clipscore_prefix_clamp_and_dtype(clip_dir):
    batch = images(seed=2)
    prefixed = build_reward({"name": "clipscore", "model": str(clip_dir), "prefix": "a photo of "})
    cos, _ = reference_clip(clip_dir, batch, ["a photo of " + p for p in PROMPTS])
    torch.testing.assert_close(prefixed(batch, PROMPTS, [{}] * 3).info["clip_cos"], cos, atol=1e-6, rtol=1e-5)
    # Negative cosines score 0 rather than below it.
    reward = build_reward({"name": "clipscore", "model": str(clip_dir)})
    reward._load()
    with torch.no_grad():
        reward.model.visual_projection.weight.neg_()
    reward._loaded = True
    out = reward(batch, PROMPTS, [{}] * 3)
    assert torch.all(out.scores >= 0) and torch.all(out.scores[out.info["clip_cos"] < 0] == 0)
    half = build_reward({"name": "clipscore", "model": str(clip_dir), "dtype": "bfloat16"})
    out = half(batch, PROMPTS, [{}] * 3)
    assert half.model.dtype == torch.bfloat16 and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.info["clip_cos"], reference_clip(clip_dir, batch, PROMPTS)[0], atol=0.05, rtol=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_matches_formula(clip_dir, tmp_path, suffix):
    # The published head's shapes and state-dict keys, with the CLIP embedding size of the tiny model.
    sizes = [24, 1024, 128, 64, 16, 1]
    g = torch.Generator().manual_seed(3)
    weights = {}
    for key, (n_in, n_out) in zip(["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"], zip(sizes, sizes[1:])):
        weights[f"{key}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        weights[f"{key}.bias"] = torch.randn(n_out, generator=g)
    path = tmp_path / f"aesthetic{suffix}"
    if suffix == ".pth":
        torch.save(weights, path)
    else:
        from safetensors.torch import save_file

        save_file(weights, str(path))
    batch = images(seed=4)
    reward = build_reward({"name": "aesthetic", "weights": str(path), "clip": str(clip_dir), "batch_size": 2})
    out = reward(batch, PROMPTS, [{}] * 3)

    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor.image_processor(pil_images(batch), return_tensors="pt")["pixel_values"]
        x = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        x = x / x.norm(dim=-1, keepdim=True)
        for key in ["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"]:  # linear layers, no activations
            x = x @ weights[f"{key}.weight"].T + weights[f"{key}.bias"]
    torch.testing.assert_close(out.scores, x[:, 0], atol=1e-4, rtol=1e-5)


def test_missing_paths_and_offline_hub_ids(clip_dir, tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        build_reward({"name": "pickscore", "model": missing, "processor": str(clip_dir)})
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        build_reward({"name": "clipscore", "model": str(clip_dir), "processor": missing})
    with pytest.raises(ValueError, match="pass a local path"):
        build_reward("aesthetic")
    with pytest.raises(FileNotFoundError, match="pass a local path"):
        build_reward({"name": "aesthetic", "weights": str(tmp_path / "head.pth"), "clip": str(clip_dir)})
    with pytest.raises(FileNotFoundError, match="pass a local path"):
        build_reward({"name": "hps", "checkpoint": str(tmp_path / "HPS_v2.1_compressed.pt")})
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        build_reward({"name": "imagereward", "checkpoint": str(tmp_path / "ImageReward.pt")})
    # Hub ids are only tried on the first call (building is free), and fail offline with a way out.
    reward = build_reward({"name": "pickscore", "model": "diffrl-test/no-such-model", "processor": str(clip_dir)})
    with pytest.raises(OSError, match="pass a local path"):
        reward(images(1), PROMPTS[:1], [{}])


def test_defaults_build_without_loading():
    for name in ["pickscore", "clipscore"]:
        reward = build_reward(name)
        assert not hasattr(reward, "model") and not hasattr(reward, "processor")
        assert reward.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        build_reward({"name": "clipscore", "batch_size": 0})


# HPS ---------------------------------------------------------------------------------------------

def test_hps_tiny_open_clip_matches_formula(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = tmp_path / "diffrl-tiny-hps.json"
    config.write_text('{"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,'
                      ' "patch_size": 8}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,'
                      ' "heads": 2, "layers": 1}}')
    open_clip.add_model_config(str(config))
    torch.manual_seed(5)
    model, _, preprocess = open_clip.create_model_and_transforms("diffrl-tiny-hps", pretrained=None)
    checkpoint = tmp_path / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)  # the released HPS files' layout
    batch = images(seed=6)
    out = build_reward({"name": "hps", "checkpoint": str(checkpoint), "arch": "diffrl-tiny-hps", "batch_size": 2,
                        "scale": 100})(batch, PROMPTS, [{}] * 3)
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(p) for p in pil_images(batch)]))
        text = model.encode_text(open_clip.get_tokenizer("diffrl-tiny-hps")(PROMPTS))
        cos = F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(out.info["hps_cos"], cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores, 100 * cos, atol=1e-3, rtol=1e-5)


class FakeOpenCLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(3, 4)
        self.token_embedding = nn.Embedding(50, 4)

    def encode_image(self, pixels):
        return self.visual(pixels.mean(dim=(2, 3)))

    def encode_text(self, tokens):
        return self.token_embedding(tokens).sum(1)


def fake_preprocess(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def fake_tokenizer(prompts):
    return torch.tensor([[len(p) % 50, len(p.split())] for p in prompts])


def test_hps_formula_with_fake_open_clip(tmp_path, monkeypatch):
    import rewards.hps

    trained = FakeOpenCLIP()
    checkpoint = tmp_path / "HPS_fake.pt"
    torch.save({"state_dict": trained.state_dict()}, checkpoint)
    # The adapter builds an untrained model and must load the checkpoint into it.
    monkeypatch.setattr(rewards.hps, "build_open_clip", lambda arch: (FakeOpenCLIP(), fake_preprocess, fake_tokenizer))
    batch = images(seed=7)
    out = build_reward({"name": "hps", "checkpoint": str(checkpoint), "batch_size": 2})(batch, PROMPTS, [{}] * 3)
    with torch.no_grad():
        image = trained.encode_image(torch.stack([fake_preprocess(p) for p in pil_images(batch)]))
        cos = F.cosine_similarity(image, trained.encode_text(fake_tokenizer(PROMPTS)), dim=-1)
    torch.testing.assert_close(out.scores, cos, atol=1e-6, rtol=1e-5)


def test_hps_without_open_clip_says_what_to_install(tmp_path, monkeypatch):
    checkpoint = tmp_path / "HPS.pt"
    torch.save({}, checkpoint)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    reward = build_reward({"name": "hps", "checkpoint": str(checkpoint)})
    with pytest.raises(ImportError, match="pip install open-clip-torch"):
        reward(images(1), PROMPTS[:1], [{}])


# ImageReward -------------------------------------------------------------------------------------

class FakeTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 8)

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        assert return_dict and encoder_attention_mask.shape == encoder_hidden_states.shape[:2]
        text = self.embed(input_ids) * attention_mask[..., None]
        return SimpleNamespace(last_hidden_state=text + encoder_hidden_states.mean(1, keepdim=True))


class VisualEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)

    def forward(self, pixels):
        return self.proj(pixels.flatten(2).transpose(1, 2))  # (B, patches, 8)


class FakeImageReward(nn.Module):
    """The attributes of ImageReward.ImageReward that the adapter uses, with toy modules."""

    def __init__(self):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = VisualEncoder()
        self.blip.text_encoder = FakeTextEncoder()
        self.blip.tokenizer = self.tokenize
        self.preprocess = fake_preprocess
        self.mlp = nn.Linear(8, 1)

    @staticmethod
    def tokenize(prompts, padding, truncation, max_length, return_tensors):
        assert (padding, truncation, max_length) == ("max_length", True, 35)  # the package's settings
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            words = [sum(map(ord, w)) % 100 for w in p.split()]
            ids[i, 1:1 + len(words)], mask[i, :1 + len(words)] = torch.tensor(words), 1
        return {"input_ids": ids, "attention_mask": mask}


def test_imagereward_standardises_raw_reward(monkeypatch):
    import rewards.imagereward

    fake = FakeImageReward()
    monkeypatch.setattr(rewards.imagereward, "load_imagereward", lambda checkpoint, med_config, device: fake)
    batch = images(seed=8)
    out = build_reward({"name": "imagereward", "batch_size": 2})(batch, PROMPTS, [{}] * 3)
    with torch.no_grad():
        raw = []
        for image, prompt in zip(pil_images(batch), PROMPTS):  # one pair at a time, as the package's score()
            tokens = fake.tokenize([prompt], "max_length", True, 35, "pt")
            embeds = fake.blip.visual_encoder(fake_preprocess(image)[None])
            hidden = fake.blip.text_encoder(tokens["input_ids"], tokens["attention_mask"], embeds,
                                            torch.ones(embeds.shape[:2], dtype=torch.long), True).last_hidden_state
            raw.append(fake.mlp(hidden[:, 0]).item())
    raw = torch.tensor(raw)
    torch.testing.assert_close(out.info["imagereward_raw"], raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores, (raw - 0.16717362830052426) / 1.0333394966054072, atol=1e-5, rtol=1e-5)


def test_imagereward_without_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    reward = build_reward("imagereward")
    with pytest.raises(ImportError, match="pip install image-reward"):
        reward(images(1), PROMPTS[:1], [{}])
