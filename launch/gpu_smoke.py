"""GPU smoke test: every objective a few epochs on the shipped shapes models in bf16, and on tiny random
SDXL and FLUX pipelines; prints images/s and peak GPU memory per run and writes them as JSON.

    bash launch/gpu_smoke.sh            # on a machine with one CUDA GPU, under 5 minutes
    python launch/gpu_smoke.py --device cpu --epochs 1   # the same runs on the CPU (plumbing only)

A run fails loudly (non-zero exit) if training raises or its weights end non-finite or unmoved.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, recipe, model, objective overrides): every objective on the family that serves it.
RUNS = [
    ("ddpo shapes-sd", "configs/ddpo_shapes_sd.yaml", "shapes-sd", []),
    ("nft shapes-sd", "configs/nft_shapes_flow.yaml", "shapes-sd", []),
    ("awm shapes-sd", "configs/awm_shapes_flow.yaml", "shapes-sd", []),
    ("flow_grpo shapes-flow", "configs/flow_grpo_shapes_flow.yaml", "shapes-flow", []),
    ("nft shapes-flow", "configs/nft_shapes_flow.yaml", "shapes-flow", []),
    ("awm shapes-flow", "configs/awm_shapes_flow.yaml", "shapes-flow", []),
    ("ddpo tiny-sdxl", "configs/ddpo_shapes_sd.yaml", "sdxl", []),
    ("nft tiny-sdxl", "configs/nft_shapes_flow.yaml", "sdxl", []),
    ("flow_grpo tiny-flux", "configs/flow_grpo_shapes_flow.yaml", "flux", ["model.guidance_scale=3.5"]),
    ("nft tiny-flux", "configs/nft_shapes_flow.yaml", "flux", ["model.guidance_scale=3.5"]),
]

SMALL = ["sample.groups_per_epoch=2", "sample.group_size=8", "sample.batch_size=16", "train.batch_size=8",
         "train.gradient_accumulation_steps=1", "eval.every=0", "log.tensorboard=false", "reward=brightness",
         "checkpoint.keep=1", "train.ema_decay=0"]


def tiny_models(root: Path) -> dict[str, str]:
    """Tiny random SDXL and FLUX pipelines (built from configs, nothing downloaded), saved under ``root``."""
    from finetune.models import tiny
    from finetune.models.hub import save_pipeline

    save_pipeline(tiny.sdxl_pipeline(), root / "sdxl")
    save_pipeline(tiny.flux_pipeline(), root / "flux")
    return {"sdxl": str(root / "sdxl"), "flux": str(root / "flux")}


def run(name: str, recipe: str, model: str, extra: list[str], out: Path, epochs: int, device: str) -> dict:
    from finetune.config import load_config
    from finetune.trainer import Trainer

    precision = "bf16" if device == "cuda" else "no"
    cfg = load_config(recipe, [*SMALL, *extra, f"model.path={model}", f"output_dir={out}", f"train.epochs={epochs}",
                               f"train.mixed_precision={precision}", f"cpu={str(device == 'cpu').lower()}"])
    trainer = Trainer(cfg)
    before = {n: p.detach().float().clone() for n, p in trainer.trainable_state().items()}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.time()
    history = trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - started
    after = trainer.trainable_state()
    finite = all(torch.isfinite(p).all() for p in after.values())
    moved = any(not torch.equal(before[n], p.detach().float()) for n, p in after.items())
    images = epochs * cfg.sample.groups_per_epoch * cfg.sample.group_size
    result = {"run": name, "epochs": epochs, "images": images, "seconds": round(seconds, 2),
              "images_per_s": round(images / seconds, 2), "reward_last": history[-1]["reward_mean"],
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
              "finite": finite, "moved": moved}
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run names containing any of these words")
    ap.add_argument("--out", default="runs/gpu_smoke")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; pass --device cpu to check the plumbing on the CPU")
    results, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"shapes-sd": "shapes-sd", "shapes-flow": "shapes-flow", **tiny_models(Path(tmp))}
        for name, recipe, model, extra in RUNS:
            if args.only and not any(word in name for word in args.only):
                continue
            try:
                result = run(name, recipe, models[model], extra, Path(tmp) / name.replace(" ", "_"), args.epochs,
                             args.device)
            except Exception as err:  # report every run, then fail
                result = {"run": name, "error": f"{type(err).__name__}: {err}"}
            results.append(result)
            if "error" in result or not (result["finite"] and result["moved"]):
                failed.append(name)
            print(json.dumps(result), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_smoke.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{'run':<24}{'images/s':>10}{'peak GiB':>10}  ok")
    for r in results:
        ok = "error" not in r and r["finite"] and r["moved"]
        print(f"{r['run']:<24}{r.get('images_per_s', '-')!s:>10}{r.get('peak_gib') or '-'!s:>10}  {'yes' if ok else 'NO'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
