"""Train the shapes world's object-size classifier (the CTRL reward, rewards/size.py) on renders.

The offline labelled dataset: renders of the train prompts, each with a uniformly drawn size class
(small / medium / large third of the object's radius range, ``eval.shapes.render.SIZE_CLASSES``),
with light Gaussian pixel noise so that decoded samples are not out of distribution. A held-out set of
eval-prompt renders fits the softmax temperature (LBFGS on the negative log-likelihood, as CTRL's
official code calibrates its classifiers) and measures the accuracy. Reproducible from its seed:

    python launch/train_size_classifier.py --out assets/size-classifier --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from eval.run import load_records
from eval.shapes.render import SIZE_CLASSES, render
from rewards.size import SizeClassifier


def renders(records: list[dict], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    images, labels = [], []
    for i in range(n):
        k = rng.randrange(len(SIZE_CLASSES))
        image, _ = render(rng.choice(records), seed * 1_000_003 + i, SIZE_CLASSES[k])
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
        labels.append(k)
    return torch.stack(images), torch.tensor(labels)


def fit_temperature(model: SizeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        model.temperature.fill_(1.0)
        logits = model(images)
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def nll():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().exp())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/size-classifier")
    ap.add_argument("--train-images", type=int, default=12000)
    ap.add_argument("--eval-images", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.03, help="std of the Gaussian pixel noise added in training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    x, y = renders(load_records("shapes:train"), args.train_images, args.seed)
    x_eval, y_eval = renders(load_records("shapes:eval"), args.eval_images, args.seed + 1)
    model = SizeClassifier(list(SIZE_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(x) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - 127, 128):
            idx = order[start:start + 128]
            batch = (x[idx] + args.noise * torch.randn_like(x[idx])).clamp(0, 1)
            loss = torch.nn.functional.cross_entropy(model(batch), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            accuracy = float((model(x_eval).argmax(1) == y_eval).float().mean())
        print(f"epoch {epoch + 1}: loss {float(loss.detach()):.3f}, held-out accuracy {accuracy:.3f}")
    model.eval()
    temperature = fit_temperature(model, x_eval, y_eval)
    with torch.no_grad():
        model.temperature.fill_(temperature)
        nll = float(torch.nn.functional.cross_entropy(model(x_eval), y_eval))
    model.save(args.out)
    report = {"held_out_accuracy": accuracy, "temperature": temperature, "held_out_nll": nll,
              "train_images": len(x), "eval_images": len(x_eval), "seconds": round(time.time() - started, 1),
              "command": "python launch/train_size_classifier.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
