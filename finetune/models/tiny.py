"""Builders of tiny diffusers pipelines from configs: the shipped shapes models and test models.

Nothing here downloads anything. The tokenizer is a CLIP BPE tokenizer whose vocabulary is the
shapes-world grammar (every word one token), written as ``vocab.json`` + ``merges.txt`` so that
``CLIPTokenizer.from_pretrained`` loads it like any CLIP tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from eval.shapes import grammar

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
MAX_TOKENS = 16  # longest shapes prompt is 10 words + 2 special tokens


def _bytes_to_unicode() -> list[str]:
    # CLIP's reversible byte -> printable-character table (the base alphabet of its BPE).
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def grammar_words() -> list[str]:
    words = set()
    for records in grammar.all_prompts().values():
        for record in records:
            words.update(record["prompt"].split())
    return sorted(words)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def write_tokenizer(directory: str | Path, max_length: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell every grammar word as a single token."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _bytes_to_unicode()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    # Add merges until BPE spells every word whole; each new merge is the last one applied, so it
    # always joins two pieces of the word it is made for.
    unfinished = grammar_words()
    while unfinished:
        pieces = _bpe(unfinished[0], ranks)
        if len(pieces) == 1:
            unfinished.pop(0)
            continue
        ranks[(pieces[0], pieces[1])] = len(ranks)
        vocab_list.append(pieces[0] + pieces[1])
    vocab_list = list(dict.fromkeys(vocab_list)) + list(SPECIAL)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                        model_max_length=max_length, pad_token="<|endoftext|>")
    tok.save_pretrained(directory)
    return tok


def text_config(vocab_size: int, hidden: int = 64, layers: int = 2, max_length: int = MAX_TOKENS) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), max_position_embeddings=max_length, projection_dim=hidden,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def vae(channels: tuple[int, ...] = (16, 32, 32), latent_channels: int = 4, sample_size: int = 64) -> AutoencoderKL:
    """Downsamples by 2**(len(channels)-1): 64x64 images -> 16x16 latents with three blocks."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=min(16, channels[0]), sample_size=sample_size, shift_factor=0.0,
    )


def _tokenizer(tokenizer_dir: str | Path | None) -> CLIPTokenizer:
    if tokenizer_dir is None:
        tokenizer_dir = tempfile.mkdtemp(prefix="diffrl-tok-")
        return write_tokenizer(tokenizer_dir)
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def sd_pipeline(unet_channels=(32, 64, 64), text_hidden=64, text_layers=2, vae_channels=(16, 32, 32),
                tokenizer_dir=None, latent_size=16) -> StableDiffusionPipeline:
    """An epsilon-prediction latent-diffusion pipeline with random weights."""
    tok = _tokenizer(tokenizer_dir)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=unet_channels,
        # Attention only below full latent resolution: most of the quality for a third of the cost.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=text_hidden, attention_head_dim=8, norm_num_groups=min(16, unet_channels[0]),
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae(vae_channels), text_encoder=CLIPTextModel(text_config(len(tok), text_hidden, text_layers)),
        tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def sd3_pipeline(layers=4, head_dim=32, heads=2, text_hidden=64, text_layers=2, vae_channels=(16, 32, 32),
                 tokenizer_dir=None, latent_size=16) -> StableDiffusion3Pipeline:
    """A rectified-flow MMDiT pipeline (SD3 layout, two CLIP encoders, no T5) with random weights."""
    tok = _tokenizer(tokenizer_dir)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * text_hidden,
        caption_projection_dim=head_dim * heads, pooled_projection_dim=2 * text_hidden,
        pos_embed_max_size=latent_size,
    )
    config = text_config(len(tok), text_hidden, text_layers)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae(vae_channels), text_encoder=CLIPTextModelWithProjection(config), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None,
    )


def sdxl_pipeline(unet_channels=(32, 64, 64), text_hidden=64, text_layers=2, vae_channels=(16, 32, 32),
                  tokenizer_dir=None, latent_size=16, time_embed_dim=8) -> StableDiffusionXLPipeline:
    """An SDXL-layout pipeline with random weights: two CLIP encoders (the second with a projection)
    and a UNet conditioned on their pooled embedding and the six size/crop time ids."""
    tok = _tokenizer(tokenizer_dir)
    config = text_config(len(tok), text_hidden, text_layers)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=2 * text_hidden,  # both encoders' hidden states, concatenated
        attention_head_dim=8, norm_num_groups=min(16, unet_channels[0]), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + config.projection_dim,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    return StableDiffusionXLPipeline(
        vae=vae(vae_channels), text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def t5_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram) tokenizer whose vocabulary is the grammar's words, each one piece, built in memory."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in grammar_words()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def flux_pipeline(layers=1, single_layers=1, head_dim=16, heads=2, text_hidden=32, text_layers=1,
                  vae_channels=(16, 32, 32), tokenizer_dir=None, latent_size=16,
                  guidance_embeds=True) -> FluxPipeline:
    """A FLUX.1-layout pipeline (CLIP pooled + T5 sequence conditioning, packed latents) with random weights.

    ``guidance_embeds`` True is FLUX.1-dev's guidance-distilled layout, False FLUX.1-schnell's. The image
    size and T5 length are declared as call keyword arguments (``pipe.call_kwargs``; ``save_pipeline``
    keeps them), since FluxPipeline's own default is 1024 px and 512 T5 tokens.
    """
    tok = _tokenizer(tokenizer_dir)
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=text_hidden, d_kv=head_dim, d_ff=2 * text_hidden,
                                 num_layers=text_layers, num_heads=heads, relative_attention_num_buckets=8,
                                 dropout_rate=0.0))
    autoencoder = vae(vae_channels)
    autoencoder.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE statistics
    transformer = FluxTransformer2DModel(  # its tokens are 2x2 patches of latent channels (packed latents)
        patch_size=1, in_channels=4 * autoencoder.config.latent_channels, num_layers=layers,
        num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=text_hidden, pooled_projection_dim=text_hidden, guidance_embeds=guidance_embeds,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),  # RoPE dims sum to head_dim
    )
    # FLUX.1's scheduler: exponential time shift with mu from the number of latent patches.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    clip = CLIPTextModel(text_config(len(tok), text_hidden, text_layers))
    pipe = FluxPipeline(scheduler=scheduler, vae=autoencoder, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    size = latent_size * pipe.vae_scale_factor
    pipe.call_kwargs = {"height": size, "width": size, "max_sequence_length": MAX_TOKENS}
    return pipe
