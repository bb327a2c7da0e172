"""model.resolution, text_encoder_3, max_sequence_length, embedding_cache and gradient checkpointing reach the run."""

import torch
from transformers import T5Config, T5EncoderModel

from finetune.models import load_policy, tiny
from finetune.models.hub import save_pipeline
from finetune.rollout import sample
from tests.helpers import tiny_sd, tiny_sd3


def test_resolution_sets_the_latent_size_of_training_and_sampling(tmp_path):
    tiny_sd().save_pretrained(tmp_path / "sd")
    native = load_policy(str(tmp_path / "sd"), num_steps=2)
    policy = load_policy(str(tmp_path / "sd"), num_steps=2, resolution=32)
    c, h, w = native.latent_shape()
    assert policy.latent_shape() == (c, 2 * h, 2 * w)
    images = sample(policy, ["a photo of a red circle"], policy.initial_noise([0]), stochastic=False).images
    assert images.shape[-2:] == (32, 32)


def test_sd3_without_t5_loads_no_t5_and_keeps_the_t5_positions_as_zeros(tmp_path):
    pipe = tiny_sd3()
    width = pipe.transformer.config.joint_attention_dim
    t5 = T5EncoderModel(T5Config(vocab_size=len(tiny.t5_tokenizer()), d_model=width, d_kv=8, d_ff=width,
                                 num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    pipe.register_modules(text_encoder_3=t5, tokenizer_3=tiny.t5_tokenizer())
    save_pipeline(pipe, tmp_path / "sd3")
    full = load_policy(str(tmp_path / "sd3"), num_steps=2, max_sequence_length=8)
    light = load_policy(str(tmp_path / "sd3"), num_steps=2, max_sequence_length=8, text_encoder_3=False)
    assert full.pipe.text_encoder_3 is not None and light.pipe.text_encoder_3 is None
    prompts = ["a photo of a red circle"]
    with_t5, without_t5 = full.encode(prompts)["embeds"], light.encode(prompts)["embeds"]
    assert with_t5.shape == without_t5.shape  # CLIP + 8 T5 positions either way
    assert torch.equal(without_t5[:, -8:], torch.zeros_like(without_t5[:, -8:]))
    assert not torch.equal(with_t5[:, -8:], torch.zeros_like(with_t5[:, -8:]))


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    from finetune.config import load_config
    from finetune.trainer import Trainer
    from tests.helpers import FAST

    tiny_sd().save_pretrained(tmp_path / "sd")
    weights = []
    for checkpointing in (False, True):
        cfg = load_config("configs/ddpo_shapes_sd.yaml", FAST + [
            f"model.path={tmp_path / 'sd'}", f"output_dir={tmp_path / str(checkpointing)}", "train.epochs=1",
            "train.lr=1e-2", f"train.gradient_checkpointing={str(checkpointing).lower()}"])
        trainer = Trainer(cfg)
        assert trainer.policy.denoiser.is_gradient_checkpointing == checkpointing
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in trainer.trainable_state().items()})
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6)


def test_embedding_cache_encodes_each_prompt_once_and_serves_the_same_rows():
    from finetune.models import wrap_pipeline

    policy = wrap_pipeline(tiny_sd3(), guidance_scale=4.0, num_steps=2)
    calls = []
    encode = policy.encode
    policy.encode = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    a, b, c = "a photo of a red circle", "a photo of a blue square", "a photo of a green triangle"
    fresh = encode([a, b, a])
    policy.embedding_cache_size = 2
    cached = policy.embed([a, b, a])
    assert calls == [[a, b]]  # one text-encoder pass for the two distinct prompts
    assert set(cached) == set(fresh) == {"embeds", "pooled", "neg", "neg_pooled"}
    for key in fresh:
        torch.testing.assert_close(cached[key], fresh[key])
    policy.embed([b, a])
    assert calls == [[a, b]]  # both served from the cache
    policy.embed([c])  # evicts b, the least recently used
    policy.embed([a])
    policy.embed([b])
    assert calls == [[a, b], [c], [b]]
    policy.guidance_scale = 1.0  # without CFG a row has no negative embeddings: a separate entry
    assert set(policy.embed([b])) == {"embeds", "pooled"}
    assert calls[-1] == [b]


def test_training_with_the_embedding_cache_trains_the_same_weights(tmp_path):
    from finetune.config import load_config
    from finetune.trainer import Trainer
    from tests.helpers import FAST

    tiny_sd().save_pretrained(tmp_path / "sd")
    weights = []
    for cache in (0, 64):
        cfg = load_config("configs/ddpo_shapes_sd.yaml", FAST + [
            f"model.path={tmp_path / 'sd'}", f"output_dir={tmp_path / str(cache)}", "train.epochs=2",
            "train.lr=1e-2", f"model.embedding_cache={cache}"])
        trainer = Trainer(cfg)
        trainer.train()
        assert bool(trainer.policy._embeddings) == bool(cache)
        weights.append({n: p.detach().clone() for n, p in trainer.trainable_state().items()})
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6)
