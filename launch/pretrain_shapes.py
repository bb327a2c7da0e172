"""Pretrain the shipped shapes-world base models on rendered ground truth, on CPU.

    python launch/pretrain_shapes.py --stage vae    # data + shared VAE + tokenizer  (~9 min, 2 threads)
    python launch/pretrain_shapes.py --stage sd     # shapes-sd   (StableDiffusionPipeline)
    python launch/pretrain_shapes.py --stage flow   # shapes-flow (StableDiffusion3Pipeline)
    python launch/pretrain_shapes.py --stage cache  # the data cache alone, from a trained VAE (--vae)

Another round from a shipped model: ``--stage cache``, then ``--stage flow --init assets/shapes-flow``
(``--grow-layers N`` first deepens the MMDiT to N blocks without changing what it computes).

``sd`` and ``flow`` only need the ``vae`` stage's cache, so they can run side by side, one core
each (``launch/pretrain_shapes.sh`` does that). Steps, not wall-clock, bound every stage, so a seed
gives the same weights on any machine. Results go to ``assets/shapes-sd`` and ``assets/shapes-flow``.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from eval.shapes import grammar, render
from finetune.models import tiny
from finetune.models.hub import load_pipeline, save_pipeline

ROOT = Path(__file__).resolve().parents[1]
# shapes-flow has no T5: only the CLIP tokens carry the prompt, and 256 zero T5 positions would quadruple
# the cost of every joint-attention block. Training uses this and the saved folder declares it.
FLOW_CALL_KWARGS = {"max_sequence_length": 0}


def tag_balanced_prompts(n: int, seed: int) -> list[dict]:
    """Pick a tag uniformly, then a train-split prompt of that tag uniformly."""
    by_tag: dict[str, list[dict]] = {}
    for record in grammar.split("train"):
        by_tag.setdefault(record["tag"], []).append(record)
    rng = random.Random(seed)
    return [rng.choice(by_tag[rng.choice(grammar.TAGS)]) for _ in range(n)]


def to_tensor(images) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def log(stage: str, step: int, total: int, loss: float, started: float) -> None:
    print(f"[{stage}] step {step}/{total} loss {loss:.4f} ({time.time() - started:.0f}s)", flush=True)


def stage_vae(args) -> None:
    records, images = render_training_set(args)

    torch.manual_seed(args.seed)
    vae = tiny.vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    # Cosine decay: the last few hundred steps at a low rate are what fix colours and edges.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.vae_steps, eta_min=5e-5)
    gen = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for step in range(1, args.vae_steps + 1):
        x = images[torch.randint(len(images), (args.batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        # L1 keeps edges crisp; a tiny KL keeps the latent space smooth, as in SD's autoencoder.
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.vae_steps:
            log("vae", step, args.vae_steps, loss.item(), started)

    latents = encode_and_cache(args, vae, records, images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()), shift_factor=float(latents.mean()))
    print(f"[vae] latents {tuple(latents.shape)}, mean {latents.mean():.3f}, std {latents.std():.3f}")
    vae.save_pretrained(args.work / "vae")


def render_training_set(args) -> tuple[list[dict], torch.Tensor]:
    records = tag_balanced_prompts(args.images, args.seed)
    started = time.time()
    images = to_tensor([render.render(r, seed=args.seed * 1_000_003 + i)[0] for i, r in enumerate(records)])
    print(f"[data] rendered {len(images)} images in {time.time() - started:.0f}s", flush=True)
    return records, images


def encode_and_cache(args, vae: AutoencoderKL, records: list[dict], images: torch.Tensor) -> torch.Tensor:
    """Write the denoiser stages' inputs: VAE latents of the training set, its prompts, the tokenizer."""
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    tiny.write_tokenizer(args.work / "tokenizer")
    torch.save({"latents": latents, "prompts": [r["prompt"] for r in records]}, args.work / "cache.pt")
    return latents


def stage_cache(args) -> None:
    """The ``vae`` stage's data cache from an already trained VAE (to continue from the shipped models)."""
    vae = AutoencoderKL.from_pretrained(args.vae)
    records, images = render_training_set(args)
    encode_and_cache(args, vae, records, images)
    vae.save_pretrained(args.work / "vae")


def deepen(transformer: SD3Transformer2DModel, num_layers: int) -> SD3Transformer2DModel:
    """A deeper MMDiT that computes exactly what ``transformer`` computes (function-preserving growth).

    Each new block is a copy of the trained block before it with its residual gates (adaLN-Zero's
    gate rows, image and text streams) set to zero, so it starts as the identity and training opens
    it. New blocks go after the first blocks in turn; the last block (text stream output only) stays last.
    """
    old = transformer.transformer_blocks
    if not len(old) < num_layers <= 2 * len(old) - 1:
        raise ValueError(f"--grow-layers must be in ({len(old)}, {2 * len(old) - 1}], got {num_layers}")
    grown = SD3Transformer2DModel.from_config({**transformer.config, "num_layers": num_layers})
    order, extra = [], num_layers - len(old)
    for i in range(len(old) - 1):
        order.append((i, False))
        if i < extra:
            order.append((i, True))
    order.append((len(old) - 1, False))
    grown.load_state_dict({k: v for k, v in transformer.state_dict().items() if not k.startswith("transformer_blocks.")},
                          strict=False)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    for new, (i, is_copy) in zip(grown.transformer_blocks, order):
        new.load_state_dict(old[i].state_dict())
        if is_copy:
            with torch.no_grad():
                for norm in (new.norm1, new.norm1_context):  # chunks: shift, scale, gate (msa), shift, scale, gate (mlp)
                    for chunk in (2, 5):
                        norm.linear.weight[chunk * dim:(chunk + 1) * dim] = 0
                        norm.linear.bias[chunk * dim:(chunk + 1) * dim] = 0
    return grown


def stage_denoiser(args, family: str) -> None:
    cache = torch.load(args.work / "cache.pt", weights_only=True)
    latents, prompts = cache["latents"], cache["prompts"]
    torch.manual_seed(args.seed)
    if args.init:  # continue from an earlier round (a fresh optimizer, warm-up and EMA)
        pipe = load_pipeline(str(args.init))
    elif family == "sd":
        pipe = tiny.sd_pipeline(tokenizer_dir=args.work / "tokenizer")
    else:
        pipe = tiny.sd3_pipeline(layers=args.flow_layers, heads=args.flow_heads, tokenizer_dir=args.work / "tokenizer")
    if args.grow_layers:
        if family != "flow":
            raise ValueError("--grow-layers applies to the flow stage (an MMDiT)")
        pipe.transformer = deepen(pipe.transformer, args.grow_layers)
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    pipe.vae = AutoencoderKL.from_pretrained(args.work / "vae")
    shift = pipe.vae.config.shift_factor if family == "flow" else 0.0
    latents = (latents - shift) * pipe.vae.config.scaling_factor
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    for module in [denoiser, *encoders]:
        module.requires_grad_(True)
    params = list(denoiser.parameters()) + [p for m in encoders for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.sd_steps if family == "sd" else args.flow_steps
    # Linear warm-up, then cosine decay to 5 % of the rate: the low-rate tail sharpens colours and edges.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 200, 0.05 + 0.475 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    ema = EMAModel(params, decay=args.ema, use_ema_warmup=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 2)
    for module in [denoiser, *encoders]:
        module.train()
    started = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        x0 = latents[idx]
        # Drop 10% of prompts so that classifier-free guidance has an unconditional model.
        batch_prompts = ["" if rng.random() < 0.1 else prompts[i] for i in idx.tolist()]
        noise = torch.randn(x0.shape, generator=gen)
        if family == "sd":
            cond, _ = pipe.encode_prompt(batch_prompts, "cpu", 1, False)
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
            x_t = pipe.scheduler.add_noise(x0, noise, t)
            loss = F.mse_loss(denoiser(x_t, t, cond).sample, noise)
        else:
            cond, _, pooled, _ = pipe.encode_prompt(batch_prompts, batch_prompts, None, "cpu", 1, False,
                                                    **FLOW_CALL_KWARGS)
            # SD3's logit-normal time sampling (or uniform); the velocity target of rectified flow is eps - x0.
            if args.flow_time == "uniform":
                t = torch.rand(len(x0), generator=gen)
            else:
                t = torch.sigmoid(torch.randn(len(x0), generator=gen))
            x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            pred = denoiser(x_t, cond, pooled, t * 1000).sample
            loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        if step % 100 == 0 or step == steps or step == 5:
            log(family, step, steps, loss.item(), started)
        if args.save_every and step % args.save_every == 0 and step < steps:
            ema.store(params)  # snapshot the EMA weights, then carry on training the live ones
            ema.copy_to(params)
            save(pipe, args, family, step)
            ema.restore(params)
    ema.copy_to(params)
    save(pipe, args, family, steps)


def save(pipe, args, family: str, step: int) -> None:
    out = args.assets / ("shapes-sd" if family == "sd" else "shapes-flow")
    if family == "flow":
        pipe.call_kwargs = FLOW_CALL_KWARGS
    save_pipeline(pipe, out)
    if args.half and family == "flow":
        # The shipped copy: float16 halves the repository's largest file; from_pretrained loads it
        # into a float32 model unless asked otherwise.
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in pipe.transformer.state_dict().items()}
        save_file(state, out / "transformer" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    print(f"[{family}] saved {out} at step {step}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["vae", "cache", "sd", "flow"], required=True)
    ap.add_argument("--vae", type=Path, default=ROOT / "assets" / "shapes-sd" / "vae",
                    help="cache stage: the trained VAE whose latents the denoisers learn")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "pretrain")
    ap.add_argument("--assets", type=Path, default=ROOT / "assets", help="where the models are written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vae-steps", type=int, default=2400)
    ap.add_argument("--sd-steps", type=int, default=6000)
    ap.add_argument("--flow-steps", type=int, default=8000)
    ap.add_argument("--flow-layers", type=int, default=6, help="MMDiT blocks of shapes-flow")
    ap.add_argument("--flow-heads", type=int, default=4, help="attention heads (of 32 dims) of shapes-flow")
    ap.add_argument("--flow-time", choices=["logit-normal", "uniform"], default="logit-normal",
                    help="training-time distribution of shapes-flow")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=0, help="also save the EMA weights every N steps")
    ap.add_argument("--init", type=Path, default=None, help="continue training this pipeline folder")
    ap.add_argument("--half", action="store_true", help="store the MMDiT's weights in float16 (shipped copy)")
    ap.add_argument("--grow-layers", type=int, default=0,
                    help="with --init (flow): deepen the MMDiT to this many blocks, function-preserving")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "vae":
        stage_vae(args)
    elif args.stage == "cache":
        stage_cache(args)
    else:
        stage_denoiser(args, args.stage)


if __name__ == "__main__":
    main()
