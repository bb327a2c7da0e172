"""GPU memory per GPU of RL fine-tuning the real models at their official recipes' per-GPU batch sizes.

Writes ``docs/memory.md`` (tables and method) and ``docs/memory.json`` (every number). Run it with
``python launch/memory_table.py`` (CPU only, a few minutes: nothing is allocated, nothing is downloaded).

Method
------
Every module is built from its hub ``config.json`` (dicts in this script, hub id cited) on the ``meta``
device (``with torch.device("meta")`` + ``from_config``), so parameter counts and dtypes are exact
and no memory is used.

* **Weights.** ``sum(p.numel())`` over unique parameters, plus buffers, at 2 bytes (bf16) for the
  frozen parts (text encoders, VAE) and the denoiser. LoRA adapters are injected with peft
  (``denoiser.add_adapter(LoraConfig(...))``, as ``finetune/models/base.py`` does) on the meta model
  and counted the same way.
* **Training state.** Per trainable parameter: an fp32 master copy and AdamW's two fp32 moments
  (12 bytes: the "optimizer state" column), gradients (DDP: fp32, 4 bytes, plus 4 bytes for DDP's
  gradient buckets, which are a second copy unless ``gradient_as_bucket_view=True``; ZeRO: bf16,
  2 bytes), and the bf16 working copy of the denoiser (2 bytes per parameter, in the weights column).
  ZeRO-2 shards gradients and optimizer state over N GPUs; ZeRO-3 also shards the denoiser's
  parameters (frozen LoRA base included; buffers are not sharded) and holds one gathered block at a
  time. Under DDP this framework keeps trained weights in fp32 and lets accelerate's autocast make the
  bf16 copies.
* **Extra copies** this framework keeps for the recipe: an EMA of the trained weights
  (``train.ema_decay``), the old-policy copy (``WeightCopy``: DiffusionNFT, AWM) and, for full
  fine-tuning with a KL term, a frozen bf16 reference denoiser (LoRA uses the adapter-disabled model).
* **Activations** are measured, not estimated: one training forward of the denoiser at the recipe's
  per-GPU micro-batch (doubled when the recipe trains with classifier-free guidance) and resolution,
  on the meta device, with LoRA or all parameters requiring grad, inside
  ``torch.autograd.graph.saved_tensors_hooks``. The pack hook records the storage of every tensor
  autograd saves for backward; storages are deduplicated and parameter/buffer storages excluded.
  Two precisions are measured. *bf16*: the module in bf16 without autocast, as DeepSpeed runs it (the
  ZeRO rows). *AMP*: accelerate's ``mixed_precision="bf16"``, which runs the forward under CUDA autocast
  (the DDP rows), with the LoRA adapters in fp32 as the trainer keeps them. Autocast does nothing to meta
  tensors, so ``AutocastEmulation`` (a ``TorchFunctionMode``) applies CUDA autocast's op lists at the
  level of torch functions: inputs of matmul/linear/conv/attention are cast to bf16, inputs of
  LayerNorm/GroupNorm/softmax/pow/... to fp32, and autograd saves the cast copies, as under autocast
  (for example peft casts a LoRA layer's input to the fp32 adapter dtype and autocast casts it back to
  bf16 for ``lora_A``, which saves that copy). Full fine-tuning is measured with bf16 weights; under
  autocast they stand for its cached bf16 casts of the fp32 parameters (the weights column).
  On the meta device PyTorch's ``scaled_dot_product_attention`` takes the math path (which would save
  the full attention matrix, in fp32); on GPUs bf16 training uses FlashAttention, so during the
  measurement SDPA is routed to ``aten._scaled_dot_product_flash_attention``, whose autograd node
  saves q, k, v, the output and the log-sum-exp, as on the GPU.
  With gradient checkpointing (diffusers' checkpoint units: transformer blocks; ResNet and transformer
  blocks in UNets) the forward is repeated with ``torch.utils.checkpoint`` (non-reentrant): what the
  hook sees outside the units plus the units' inputs is the saved set, and at the peak of backward one
  unit is recomputed, so the largest unit's saved bytes (attributed per unit in the first pass) are
  added.

Not included: the rollout phase (no-grad sampling and VAE decoding), reward models, CUDA context,
allocator fragmentation, DeepSpeed's communication buckets, the transient activation gradients of
backward, and the loss computation outside the denoiser. The totals add the activations alive at the
end of the forward to all gradients and states: activations are freed as gradients appear (the sum is
high there), while the transient buffers left out make it low.
"""

import contextlib
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

GiB = 2**30
N_GPUS = 8
GPU_GIB = 79.6  # what an "80 GB" A100/H100 reports as total memory (81,559 MiB)

# ---------------------------------------------------------------------------------------------------
# Architecture configs (data: the public config.json of each hub repo, hub id and file cited)
# ---------------------------------------------------------------------------------------------------

# runwayml/stable-diffusion-v1-5: unet/config.json, text_encoder/config.json, vae/config.json
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
CLIP_L = {  # openai/clip-vit-large-patch14 text tower, as in every pipeline below (text_encoder/config.json)
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "vocab_size": 49408,
}
SD15_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, text_encoder(_2)/config.json, vae/config.json
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
CLIP_G = {  # OpenCLIP ViT-bigG/14 text tower (SDXL text_encoder_2, SD3 text_encoder_2), with projection
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1,
    "projection_dim": 1280, "vocab_size": 49408,
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# stabilityai/stable-diffusion-3.5-medium: transformer/config.json, text_encoder_3/config.json, vae/config.json
SD35M_TRANSFORMER = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "sample_size": 128,
}
T5_XXL = {  # google/t5-v1_1-xxl encoder (SD3 text_encoder_3, FLUX text_encoder_2)
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu",
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "num_heads": 64, "num_layers": 24,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "vocab_size": 32128,
}
SD3_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}

# black-forest-labs/FLUX.1-dev: transformer/config.json, vae/config.json (text encoders: CLIP_L, T5_XXL)
FLUX_TRANSFORMER = {
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# Where each dict comes from. The hub is not reachable from here: the values were read from public
# copies of these files (a mirror of the repo, or code that embeds the config), cross-checked between copies.
CONFIG_SOURCES = {
    "SD15_UNET, CLIP_L, SD15_VAE": "runwayml/stable-diffusion-v1-5 unet/, text_encoder/, vae/config.json "
                                   "(GitHub mirror HDRJ-One/runwayml-stable-diffusion-v1-5)",
    "SDXL_UNET, CLIP_G, SDXL_VAE": "stabilityai/stable-diffusion-xl-base-1.0 unet/, text_encoder_2/, vae/config.json "
                                   "(configs embedded in public code, three copies of the UNet config agree)",
    "SD35M_TRANSFORMER, SD3_VAE": "stabilityai/stable-diffusion-3.5-medium transformer/, vae/config.json "
                                  "(four public copies of the transformer config agree; dual attention in "
                                  "blocks 0-12, as the model card says)",
    "T5_XXL": "text_encoder_3/config.json of SD3.5-M and text_encoder_2/config.json of FLUX.1-dev "
              "(google/t5-v1_1-xxl encoder; three public copies agree)",
    "FLUX_TRANSFORMER, FLUX_VAE": "black-forest-labs/FLUX.1-dev transformer/, vae/config.json "
                                  "(five public copies of the transformer config agree)",
}

MODELS = {
    "sd15": {
        "hub": "runwayml/stable-diffusion-v1-5", "denoiser": ("unet", SD15_UNET),
        "frozen": {"text_encoder (CLIP-L)": ("clip", CLIP_L), "vae": ("vae", SD15_VAE)},
        "latent_channels": 4, "text": {"tokens": 77, "dim": 768},
    },
    "sdxl": {
        "hub": "stabilityai/stable-diffusion-xl-base-1.0", "denoiser": ("unet", SDXL_UNET),
        "frozen": {"text_encoder (CLIP-L)": ("clip", CLIP_L), "text_encoder_2 (CLIP-bigG, proj.)": ("clip_proj", CLIP_G),
                   "vae": ("vae", SDXL_VAE)},
        "latent_channels": 4, "text": {"tokens": 77, "dim": 2048, "pooled": 1280},
    },
    "sd35m": {
        "hub": "stabilityai/stable-diffusion-3.5-medium", "denoiser": ("sd3", SD35M_TRANSFORMER),
        "frozen": {"text_encoder (CLIP-L, proj.)": ("clip_proj", CLIP_L),
                   "text_encoder_2 (CLIP-G, proj.)": ("clip_proj", CLIP_G),
                   "text_encoder_3 (T5-XXL encoder)": ("t5", T5_XXL), "vae": ("vae", SD3_VAE)},
        "optional_frozen": "text_encoder_3 (T5-XXL encoder)",  # model.text_encoder_3: false drops it
        "latent_channels": 16, "text": {"tokens": 77, "dim": 4096, "pooled": 2048},  # + T5 tokens per recipe
    },
    "flux": {
        "hub": "black-forest-labs/FLUX.1-dev", "denoiser": ("flux", FLUX_TRANSFORMER),
        "frozen": {"text_encoder (CLIP-L)": ("clip", CLIP_L), "text_encoder_2 (T5-XXL encoder)": ("t5", T5_XXL),
                   "vae": ("vae", FLUX_VAE)},
        "latent_channels": 16, "text": {"tokens": 0, "dim": 4096, "pooled": 768},  # T5 tokens per recipe
    },
}

# ---------------------------------------------------------------------------------------------------
# Recipes: the official per-GPU micro-batch, resolution and LoRA of each method (sources cited)
# ---------------------------------------------------------------------------------------------------

SD_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
SD3_ATTN = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")


@dataclasses.dataclass
class Recipe:
    key: str
    title: str
    model: str
    train_batch: int          # per-GPU training micro-batch (samples)
    cfg: bool                 # trains with classifier-free guidance: the forward sees 2 x train_batch
    resolution: int
    lora_rank: int
    lora_alpha: int
    lora_targets: tuple[str, ...]
    t5_tokens: int = 0        # T5 sequence length of the prompt embedding (SD3, FLUX)
    ema: bool = False         # EMA of the trained weights
    old_copy: bool = False    # old-policy weight copy (WeightCopy)
    kl_reference: bool = False
    source: str = ""

    @property
    def forward_batch(self) -> int:
        return self.train_batch * (2 if self.cfg else 1)


RECIPES = [
    Recipe("sd15_ddpo", "SD1.5 + DDPO", "sd15", train_batch=1, cfg=True, resolution=512,
           lora_rank=4, lora_alpha=4, lora_targets=SD_ATTN,
           source="kvablack/ddpo-pytorch config/base.py: train.batch_size=1, train.cfg=True, use_lora=True, "
                  "runwayml/stable-diffusion-v1-5 at its native 512 px; scripts/train.py: diffusers "
                  "LoRAAttnProcessor (default rank 4) on to_q/to_k/to_v/to_out of every attention"),
    Recipe("sd15_ddpo_dgx", "SD1.5 + DDPO, dgx.py (full FT recipe)", "sd15", train_batch=4, cfg=True,
           resolution=512, lora_rank=4, lora_alpha=4, lora_targets=SD_ATTN,
           source="kvablack/ddpo-pytorch config/dgx.py: train.batch_size=4 (8 GPUs; an older revision trained "
                  "without LoRA, the current one with it); LoRA rows "
                  "use base.py's adapter at this batch for comparison"),
    Recipe("sdxl_ddpo", "SDXL base 1.0 + DDPO", "sdxl", train_batch=1, cfg=True, resolution=1024,
           lora_rank=4, lora_alpha=4, lora_targets=SD_ATTN,
           source="no official SDXL DDPO config exists: ddpo-pytorch's base.py trainer settings (batch 1, CFG "
                  "training, rank-4 attention LoRA) at SDXL's native 1024 px (assumed)"),
    Recipe("sd35m_flow_grpo", "SD3.5-M + Flow-GRPO", "sd35m", train_batch=9, cfg=True, resolution=512,
           lora_rank=32, lora_alpha=64, lora_targets=SD3_ATTN, t5_tokens=128, ema=True, kl_reference=True,
           source="yifan123/flow_grpo config/grpo.py geneval_sd3: resolution 512, train.batch_size = "
                  "sample.train_batch_size = 9, train.cfg=True (config/base.py), train.beta=0.04, train.ema=True; "
                  "scripts/train_sd3.py: LoraConfig(r=32, lora_alpha=64) on the 8 attn projections, "
                  "max_sequence_length=128"),
    Recipe("sd35m_nft", "SD3.5-M + DiffusionNFT", "sd35m", train_batch=9, cfg=False, resolution=512,
           lora_rank=32, lora_alpha=64, lora_targets=SD3_ATTN, t5_tokens=128, ema=True, old_copy=True,
           kl_reference=True,
           source="NVlabs/DiffusionNFT config/nft.py sd3_geneval: 8 GPUs -> train.batch_size 9, resolution 512, "
                  "guidance_scale 1 (CFG-free training), train.beta=1e-4; scripts/train_nft_sd3.py: "
                  "LoraConfig(r=32, lora_alpha=64) on the 8 attn projections plus an 'old' adapter, "
                  "max_sequence_length=128"),
    Recipe("sd35m_awm", "SD3.5-M + AWM", "sd35m", train_batch=3, cfg=False, resolution=512,
           lora_rank=32, lora_alpha=64, lora_targets=SD3_ATTN, t5_tokens=128, ema=True, old_copy=True,
           kl_reference=True,
           source="scxue/advantage_weighted_matching config/dgx_awm.py geneval_sd3_no_cfg_1node: train.batch_size 3, "
                  "resolution 512, guidance_scale 1.0, train.beta=0.001 (0.003 is its OCR config), "
                  "ema_beta=1 (proximal EMA copy), "
                  "train.ema=True, lora_type attn; scripts/train_sd3_awm.py: LoraConfig(r=32, lora_alpha=64), "
                  "max_sequence_length=128"),
    Recipe("flux_flow_grpo", "FLUX.1-dev + Flow-GRPO", "flux", train_batch=3, cfg=False, resolution=512,
           lora_rank=64, lora_alpha=128, lora_targets=FLUX_TARGETS, t5_tokens=128, ema=True,
           source="yifan123/flow_grpo config/grpo.py pickscore_flux(_8gpu): resolution 512, train.batch_size = "
                  "sample.train_batch_size = 3, train.beta=0 (no reference), train.ema=True; guidance-distilled "
                  "(guidance embedding, no CFG batch); scripts/train_flux.py: LoraConfig(r=64, lora_alpha=128) "
                  "on attention and double-block feed-forward projections, max_sequence_length=128"),
]

# ---------------------------------------------------------------------------------------------------
# Building modules on the meta device
# ---------------------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def build_module(kind: str, config: dict, device: str = "meta", dtype: torch.dtype = torch.bfloat16):
    """A diffusers/transformers module from its config dict, on ``device`` (meta: no memory)."""
    with torch.device(device):
        if kind == "unet":
            from diffusers import UNet2DConditionModel
            module = UNet2DConditionModel.from_config(config)
        elif kind == "sd3":
            from diffusers import SD3Transformer2DModel
            module = SD3Transformer2DModel.from_config(config)
        elif kind == "flux":
            from diffusers import FluxTransformer2DModel
            module = FluxTransformer2DModel.from_config(config)
        elif kind == "vae":
            from diffusers import AutoencoderKL
            module = AutoencoderKL.from_config(config)
        elif kind in ("clip", "clip_proj"):
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
            cls = CLIPTextModelWithProjection if kind == "clip_proj" else CLIPTextModel
            module = cls(CLIPTextConfig(**config))
        elif kind == "t5":
            from transformers import T5Config, T5EncoderModel
            module = T5EncoderModel(T5Config(**config))
        else:
            raise ValueError(f"unknown module kind {kind!r}")
    return module.to(dtype)


def count_params(module: torch.nn.Module) -> dict:
    """Exact counts: unique parameters, trainable ones, LoRA ones, and buffer bytes."""
    params = list(module.parameters())  # unique (tied weights once)
    return {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "lora": sum(p.numel() for n, p in module.named_parameters() if "lora_" in n),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in module.buffers()),
    }


def add_lora(module: torch.nn.Module, rank: int, alpha: int, targets) -> None:
    """LoRA as this framework adds it (finetune/models/base.py): frozen base, trainable adapters."""
    from peft import LoraConfig

    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                  target_modules=list(targets)))


def lora_params_from_shapes(module: torch.nn.Module, rank: int) -> int:
    """Independent LoRA count: r * (in + out) for every adapted Linear (peft's lora_A / lora_B)."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            base = layer.get_base_layer()
            total += rank * (base.in_features + base.out_features)
    return total


# ---------------------------------------------------------------------------------------------------
# Measuring the tensors saved for backward
# ---------------------------------------------------------------------------------------------------


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA through the FlashAttention op, so autograd saves what it saves on a GPU (not the math path)."""
    if attn_mask is not None:
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, dropout_p, is_causal, False, scale=scale)[0]


@contextlib.contextmanager
def flash_attention_path():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# CUDA autocast's op lists (torch.amp docs): ops that run in the low-precision dtype, and ops that run in
# fp32. Only the ones these models call matter; the rest run in the widest input dtype, as under autocast.
AUTOCAST_LOWER = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm",
                  "addbmm", "addmv", "addr", "mv", "einsum", "prelu", "scaled_dot_product_attention",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention"}
AUTOCAST_FP32 = {"layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "pow", "__pow__", "__rpow__",
                 "rsqrt", "exp", "expm1", "log", "log1p", "log2", "log10", "reciprocal", "sum", "prod", "cumsum",
                 "cumprod", "norm", "normalize", "softplus", "mse_loss", "l1_loss", "smooth_l1_loss",
                 "cosine_similarity", "erfinv", "acos", "asin", "cosh", "sinh", "tan", "__rdiv__", "__rtruediv__"}


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.dtype != torch.float64 and value.dtype != dtype
        return value.to(dtype) if eligible else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class AutocastEmulation(torch.overrides.TorchFunctionMode):
    """CUDA autocast (bf16) at the level of torch functions, for meta tensors, which autocast skips.

    As autocast, it casts the inputs of matmul-like ops to bf16 and of the fp32-list ops (norms, softmax,
    pow, ...) to fp32 before calling them, so that autograd records the casts and saves the cast copies.
    accelerate's ``mixed_precision="bf16"`` runs the prepared model's forward under autocast.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, lower=AUTOCAST_LOWER, fp32=AUTOCAST_FP32):
        super().__init__()
        self.dtype, self.lower, self.fp32 = dtype, lower, fp32

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "").split(".")[0]
        if name in self.lower:
            args, kwargs = _cast(args, self.dtype), {k: _cast(v, self.dtype) for k, v in kwargs.items()}
        elif name in self.fp32:
            args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _storage(t: torch.Tensor):
    st = t.untyped_storage()
    return st._cdata, st.nbytes()


class SavedTensorMeter:
    """Sums the bytes of distinct storages autograd saves for backward, per checkpoint unit.

    ``excluded``: storages not to count (parameters and buffers: they are weights, counted apart).
    ``unit``: the checkpoint unit whose forward is running (None outside units); ``by_unit`` keeps
    each unit's saved storages so the largest can be added to the checkpointed total.
    """

    def __init__(self, excluded: set[int]):
        self.excluded = excluded
        self.storages: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []  # holds every counted storage, so that no identity is reused
        self.by_unit: dict[int, dict[int, int]] = {}
        self.unit: int | None = None

    def add(self, t: torch.Tensor) -> None:
        key, nbytes = _storage(t)
        if key in self.excluded:
            return
        self.storages[key] = nbytes
        self.alive.append(t)
        if self.unit is not None:
            self.by_unit.setdefault(self.unit, {})[key] = nbytes

    def pack(self, t: torch.Tensor):
        self.add(t)
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @property
    def max_unit(self) -> int:
        return max((sum(s.values()) for s in self.by_unit.values()), default=0)


def _tensors(args) -> list[torch.Tensor]:
    found = []
    for a in args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (tuple, list)):
            found.extend(_tensors(a))
        elif isinstance(a, dict):
            found.extend(_tensors(list(a.values())))
    return found


def set_checkpointing(module: torch.nn.Module, func) -> None:
    """What diffusers' ``enable_gradient_checkpointing(func)`` does (and its disable), for any module tree."""
    for sub in module.modules():
        if hasattr(sub, "gradient_checkpointing"):
            sub._gradient_checkpointing_func = func
            sub.gradient_checkpointing = func is not None


def measure_saved(model: torch.nn.Module, inputs: dict, checkpointing: bool, amp: bool = False) -> dict:
    """Bytes saved for backward by one forward of ``model(**inputs)``.

    Every checkpoint unit runs through ``unit_func``. Without ``checkpointing`` it runs the unit directly
    and attributes what the unit saves to it; with ``checkpointing`` it runs the unit under non-reentrant
    ``torch.utils.checkpoint`` (whose own hooks hide the unit's tensors) and counts the unit's inputs,
    which the checkpoint keeps for the recomputation. ``amp``: under ``AutocastEmulation``.
    """
    excluded = {_storage(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    meter = SavedTensorMeter(excluded)
    unit_params: list[int] = []

    def unit_func(block, *args):
        unit_params.append(sum(p.numel() for p in block.parameters()))
        if checkpointing:
            for t in _tensors(args):
                meter.add(t)
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        previous, meter.unit = meter.unit, len(unit_params)
        try:
            return block(*args)
        finally:
            meter.unit = previous

    set_checkpointing(model, unit_func)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(flash_attention_path())
            if amp:
                stack.enter_context(AutocastEmulation())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t))
            model(**inputs, return_dict=False)
    finally:
        set_checkpointing(model, None)
    return {"saved_bytes": meter.total, "max_unit_bytes": meter.max_unit, "num_units": len(unit_params),
            "max_unit_params": max(unit_params, default=0)}


def prepare_denoiser(kind: str, config: dict, lora: Recipe | None, amp: bool) -> torch.nn.Module:
    """The denoiser as the training forward sees it (bf16; LoRA adapters fp32 under accelerate's AMP)."""
    model = build_module(kind, config, dtype=torch.float32)
    if lora is not None:
        add_lora(model, lora.lora_rank, lora.lora_alpha, lora.lora_targets)
    else:
        model.requires_grad_(True)
    model = model.to(torch.bfloat16)
    if lora is not None and amp:  # the trainer's cast_training_params(denoiser, torch.float32)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model.train()


def measure_activations(kind: str, config: dict, inputs: dict, lora: Recipe | None) -> dict:
    """Saved-tensor bytes of one training forward, LoRA (``lora`` given) or full fine-tuning.

    ``amp``: accelerate DDP with bf16 autocast (LoRA adapters fp32, as the trainer keeps them);
    ``bf16``: a bf16 module without autocast, as DeepSpeed runs it. Full fine-tuning is measured with
    bf16 weights in both: under autocast they stand for its cached bf16 casts of the fp32 parameters,
    which the weights column counts.
    """
    result = {}
    for mode in ("amp", "bf16"):
        model = prepare_denoiser(kind, config, lora, amp=mode == "amp")
        plain = measure_saved(model, inputs, checkpointing=False, amp=mode == "amp")
        ckpt = measure_saved(model, inputs, checkpointing=True, amp=mode == "amp")
        result[mode] = {"no_gc": plain["saved_bytes"], "gc_saved": ckpt["saved_bytes"],
                        "gc_max_unit": plain["max_unit_bytes"],
                        "gc": ckpt["saved_bytes"] + plain["max_unit_bytes"]}
        result["num_units"], result["max_unit_params"] = plain["num_units"], plain["max_unit_params"]
    result.update(count_params(model))  # the bf16 module: 2 bytes per parameter
    if lora is not None:
        result["lora_from_shapes"] = lora_params_from_shapes(model, lora.lora_rank)
    return result


def denoiser_inputs(kind: str, model_spec: dict, recipe: Recipe, device="meta", dtype=torch.bfloat16) -> dict:
    """The denoiser's training-forward arguments at the recipe's batch and resolution."""
    b = recipe.forward_batch
    side = recipe.resolution // 8  # every VAE here downsamples 8x
    text = model_spec["text"]
    tokens = text["tokens"] + recipe.t5_tokens
    with torch.device(device):
        latents = torch.randn(b, model_spec["latent_channels"], side, side, dtype=dtype)
        context = torch.randn(b, tokens, text["dim"], dtype=dtype)
        timestep = torch.rand(b) * 1000
        if kind == "unet":
            inputs = {"sample": latents, "timestep": timestep, "encoder_hidden_states": context}
            if "pooled" in text:  # SDXL's added conditions
                inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(b, text["pooled"], dtype=dtype),
                                               "time_ids": torch.randn(b, 6, dtype=dtype)}
            return inputs
        pooled = torch.randn(b, text["pooled"], dtype=dtype)
        if kind == "sd3":
            return {"hidden_states": latents, "encoder_hidden_states": context, "pooled_projections": pooled,
                    "timestep": timestep}
        if kind == "flux":  # 2x2 patches packed into tokens, as FluxPipeline._pack_latents
            packed = torch.randn(b, (side // 2) ** 2, model_spec["latent_channels"] * 4, dtype=dtype)
            return {"hidden_states": packed, "encoder_hidden_states": context, "pooled_projections": pooled,
                    "timestep": timestep / 1000, "guidance": torch.full((b,), 3.5),
                    "img_ids": torch.zeros((side // 2) ** 2, 3), "txt_ids": torch.zeros(tokens, 3)}
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------
# From counts to the memory table
# ---------------------------------------------------------------------------------------------------


def frozen_weights(model_key: str) -> dict[str, dict]:
    out = {}
    for name, (kind, config) in MODELS[model_key]["frozen"].items():
        c = count_params(build_module(kind, config))
        out[name] = {"params": c["params"], "bytes": c["param_bytes"] + c["buffer_bytes"]}
    return out


def memory_row(strategy: str, finetune: str, recipe: Recipe, frozen_bytes: int, act: dict, n: int = N_GPUS) -> dict:
    """Bytes per GPU of one {LoRA, full} x {DDP, ZeRO-2, ZeRO-3} configuration."""
    params = act["params"]
    trainable = act["lora"] if finetune == "LoRA" else params
    weights = 2 * params + act["buffer_bytes"]
    if strategy == "DDP":
        grads = (4 + 4) * trainable       # fp32 gradients + DDP's bucket copy
        optim = 12 * trainable            # fp32 master + AdamW m, v
        copy_bytes = 4                    # EMA / old copies are clones of fp32 parameters
    elif strategy == "ZeRO-2":
        grads = 2 * trainable / n
        optim = 12 * trainable / n
        copy_bytes = 2                    # DeepSpeed's module parameters are bf16
    else:  # ZeRO-3
        grads = 2 * trainable / n
        optim = 12 * trainable / n
        weights = 2 * params / n + act["buffer_bytes"] + 2 * act["max_unit_params"]  # + one gathered unit
        copy_bytes = 2 / n                # copies kept partitioned (gathered whole: the ZeRO-2 amount)
    extra = copy_bytes * trainable * (int(recipe.ema) + int(recipe.old_copy))
    if finetune == "full" and recipe.kl_reference:
        extra += 2 * params / (n if strategy == "ZeRO-3" else 1)
    measured = act["amp" if strategy == "DDP" else "bf16"]
    act_no_gc, act_gc = measured["no_gc"], measured["gc"]
    static = frozen_bytes + weights + grads + optim + extra
    return {
        "finetune": finetune, "strategy": strategy, "frozen": frozen_bytes, "denoiser_weights": weights,
        "grads": grads, "optimizer": optim, "extra_copies": extra, "act_no_gc": act_no_gc, "act_gc": act_gc,
        "total_no_gc": static + act_no_gc, "total_gc": static + act_gc,
    }


def recipe_result(recipe: Recipe, frozen: dict, acts: dict) -> dict:
    spec = MODELS[recipe.model]
    frozen_total = sum(v["bytes"] for v in frozen.values())
    rows = [memory_row(s, f, recipe, frozen_total, acts[f]) for f in ("LoRA", "full")
            for s in ("DDP", "ZeRO-2", "ZeRO-3")]
    result = {"recipe": dataclasses.asdict(recipe), "forward_batch": recipe.forward_batch, "hub": spec["hub"],
              "frozen": frozen, "activations": acts, "rows": rows, "n_gpus": N_GPUS, "gpu_gib": GPU_GIB}
    optional = spec.get("optional_frozen")
    if optional:
        result["without_optional_frozen"] = {"dropped": optional, "saves_bytes": frozen[optional]["bytes"]}
    return result


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def fits(total: float) -> str:
    return "yes" if total / GiB <= GPU_GIB else "no"


def markdown_table(result: dict) -> list[str]:
    lines = ["| fine-tuning | strategy | frozen | denoiser weights | grads | optimizer state | extra copies | "
             "activations no GC / GC | total no GC / GC | fits 80 GB (no GC / GC) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['finetune']} | {r['strategy']} | {gib(r['frozen'])} | {gib(r['denoiser_weights'])} | "
                     f"{gib(r['grads'])} | {gib(r['optimizer'])} | {gib(r['extra_copies'])} | "
                     f"{gib(r['act_no_gc'])} / {gib(r['act_gc'])} | {gib(r['total_no_gc'])} / {gib(r['total_gc'])} | "
                     f"{fits(r['total_no_gc'])} / {fits(r['total_gc'])} |")
    return lines


def recipe_section(result: dict) -> list[str]:
    r = result["recipe"]
    lora, full = result["activations"]["LoRA"], result["activations"]["full"]
    extras = [name for flag, name in ((r["ema"], "EMA"), (r["old_copy"], "old-policy copy"),
                                       (r["kl_reference"], "KL reference (full FT only)")) if flag]
    lines = [f"### {r['title']}", "",
             f"Model `{result['hub']}`; per-GPU micro-batch {r['train_batch']}"
             + (f" (x2 for CFG: the denoiser sees {result['forward_batch']})" if r["cfg"] else "")
             + f", {r['resolution']} px; LoRA r={r['lora_rank']}, alpha={r['lora_alpha']} on "
             f"`{', '.join(r['lora_targets'])}`; extra copies: {', '.join(extras) or 'none'}.",
             f"Source: {r['source']}.", "",
             f"Denoiser {full['params'] / 1e9:.3f} B parameters ({full['num_units']} checkpoint units); "
             f"LoRA {lora['lora'] / 1e6:.2f} M parameters (peft on the meta model; r x (in + out) over the "
             f"adapted layers: {lora['lora_from_shapes'] / 1e6:.2f} M). Frozen: "
             + ", ".join(f"{k} {v['params'] / 1e9:.3f} B" for k, v in result["frozen"].items()) + ".", ""]
    lines += markdown_table(result)
    opt = result.get("without_optional_frozen")
    if opt:
        saved = opt["saves_bytes"]
        changed = [f"{row['finetune']} {row['strategy']} ({mode}: no -> yes)" for row in result["rows"]
                   for mode, key in (("no GC", "total_no_gc"), ("GC", "total_gc"))
                   if fits(row[key]) == "no" and fits(row[key] - saved) == "yes"]
        lines += ["", f"Without T5 (`model.text_encoder_3: false`) every total is {gib(saved)} GiB lower"
                  + (f"; that changes {', '.join(changed)}." if changed else "; no verdict changes.")]
    detail = "; ".join(
        f"{ft} {mode}: boundary {gib(a[mode]['gc_saved'])} + largest unit {gib(a[mode]['gc_max_unit'])}"
        for ft, a in (("LoRA", lora), ("full", full)) for mode in ("amp", "bf16"))
    lines += ["", f"GC activations (GiB) = saved outside the units and unit inputs + the largest unit's saved "
                  f"tensors, AMP (DDP) and bf16 (ZeRO): {detail}."]
    return lines + [""]


def method_section() -> list[str]:
    doc = __doc__.split("Method\n------\n", 1)[1]
    return ["## Method", "", doc.strip(), ""]


def summary_table(results: list[dict]) -> list[str]:
    """One line per recipe: total per GPU with gradient checkpointing (without it in brackets)."""
    configs = [(r["finetune"], r["strategy"]) for r in results[0]["rows"]]
    lines = ["| recipe (per-GPU micro-batch) | " + " | ".join(f"{f} {s}" for f, s in configs) + " |",
             "|---|" + "---|" * len(configs)]
    for result in results:
        cells = []
        for row in result["rows"]:
            share = row["total_gc"] / GiB / GPU_GIB
            mark = " ✗" if share > 1 else (" !" if share > 0.9 else "")
            cells.append(f"{gib(row['total_gc'])} ({gib(row['total_no_gc'])}){mark}")
        r = result["recipe"]
        lines.append(f"| {r['title']} ({r['train_batch']}{' x2 CFG' if r['cfg'] else ''}) | " + " | ".join(cells) + " |")
    return lines


def render(results: list[dict]) -> str:
    lines = ["# GPU memory of RL fine-tuning the real models", "",
             "Generated by `python launch/memory_table.py` (CPU, meta device: nothing allocated or downloaded). "
             f"GiB per GPU, {N_GPUS} GPUs for ZeRO. \"Fits\" compares the total with the "
             f"{GPU_GIB} GiB an 80 GB A100/H100 reports, with no allowance for the CUDA context "
             "(about 0.5 GiB), fragmentation, the rollout phase or reward models. bf16 (fp16 recipes have the "
             "same byte counts). DDP means accelerate's DDP with `mixed_precision: bf16` as this framework "
             "trains; ZeRO-2/3 mean DeepSpeed with bf16.", "",
             "## Summary", "",
             "Total GiB per GPU with gradient checkpointing (without it in brackets); ✗: over 80 GB even "
             "with checkpointing; !: within 10 % of it.", ""]
    lines += summary_table(results)
    lines += ["", "## Tables", "",
              "Columns: *frozen* = text encoders + VAE (bf16); *denoiser weights* = its bf16 copy, adapters "
              "included (ZeRO-3: 1/N plus one gathered block); *grads* = gradients of the trained parameters "
              "(DDP: fp32 plus DDP's bucket copy; ZeRO: bf16, 1/N); *optimizer state* = fp32 master copy + "
              "AdamW moments (ZeRO: 1/N); *extra copies* = EMA / old policy / KL reference kept by the recipe; "
              "*activations* = measured tensors saved for backward for one micro-batch, without and with "
              "gradient checkpointing (GC).", ""]
    for result in results:
        lines += recipe_section(result)
    lines += ["## Architecture configs", "",
              "The dicts in `launch/memory_table.py`, with the hub file each comes from:", ""]
    lines += [f"- `{names}`: {where}" for names, where in CONFIG_SOURCES.items()]
    lines += [""] + method_section()
    lines += ["## Assumptions and caveats", "",
              "- SDXL has no official DDPO recipe: ddpo-pytorch's base.py settings (batch 1, CFG training, rank-4 "
              "attention LoRA) are assumed at 1024 px.",
              "- Recipes that train with classifier-free guidance (DDPO, Flow-GRPO on SD3.5-M) run the denoiser "
              "on the conditional and unconditional halves in one batch, so it sees twice the micro-batch.",
              "- The SD3.5-M LoRA targets are the official ones (`attn.*`): peft's suffix match leaves the second "
              "attention (`attn2`) of the 13 MMDiT-X blocks without an adapter. This framework's default "
              "(`to_q`, ... without the `attn.` prefix) would adapt `attn2` too.",
              "- Official codes keep the VAE in fp32 (Flow-GRPO, NFT, AWM) and leave the LoRA "
              "base transformer in fp32 (`pipeline.transformer.to(device)`); this framework casts frozen parts "
              "to the training dtype, which is what the frozen and weights columns count.",
              "- ddpo-pytorch's own note (about 10 GB for SD1.5 LoRA at batch 1) includes the rollout and its "
              "LoRAAttnProcessor's unfused attention, which saves the attention matrices; the table assumes "
              "FlashAttention (PyTorch SDPA on a GPU).",
              "- ZeRO rows: DeepSpeed bf16 as in `launch/accelerate/zero2.yaml` / `zero3.yaml` (only the prepared "
              "denoiser is sharded; frozen parts stay whole). Under ZeRO-3 a parameter's data is empty outside "
              "DeepSpeed's forward, so the EMA, old-policy and reference copies must be taken with a gather; the "
              "ZeRO-3 rows count them kept partitioned (1/N). Gathered whole copies would cost the ZeRO-2 "
              "amounts instead.",
              "- `WeightCopy.swapped_in` clones the trained weights once more while the old policy is evaluated "
              "(outside the backward peak; for full fine-tuning under DDP that is another 4 bytes per parameter "
              "at that moment).",
              "- The DDP rows' activations come from the autocast emulation (CUDA autocast's op lists applied to "
              "torch functions on the meta device); `tests/test_memory_table.py` checks it against real autocast "
              "on the CPU (CPU autocast has no fp32 list, so that check covers the bf16 casts).", ""]
    return "\n".join(lines)


def main(out_dir: str = "docs") -> None:
    quiet_libraries()
    torch.manual_seed(0)
    results, frozen_cache, act_cache = [], {}, {}
    for recipe in RECIPES:
        start = time.time()
        spec = MODELS[recipe.model]
        kind, config = spec["denoiser"]
        if recipe.model not in frozen_cache:
            frozen_cache[recipe.model] = frozen_weights(recipe.model)
        inputs = denoiser_inputs(kind, spec, recipe)
        key = (recipe.model, recipe.forward_batch, recipe.resolution, recipe.t5_tokens, recipe.lora_rank,
               recipe.lora_targets)
        if key not in act_cache:
            act_cache[key] = {"LoRA": measure_activations(kind, config, inputs, recipe),
                              "full": measure_activations(kind, config, inputs, None)}
        results.append(recipe_result(recipe, frozen_cache[recipe.model], act_cache[key]))
        print(f"{recipe.key}: {time.time() - start:.1f} s", file=sys.stderr)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "memory.md").write_text(render(results))
    print(f"wrote {out / 'memory.md'} and {out / 'memory.json'}", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
