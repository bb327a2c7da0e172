"""Atomic checkpoints: a crash while writing never damages the last good checkpoint.

A checkpoint is a folder ``checkpoint-<epoch>`` holding the trainable weights (safetensors), the
optimizer state (and the fp16 grad scaler's, when there is one; under DeepSpeed instead a folder
``deepspeed`` of per-process shards written by accelerate's ``save_state``), and ``state.json`` (epoch,
advantage tracker, history, what was trained). It is written under a temporary name and renamed
into place, then ``latest`` is replaced atomically to point at it.

Rotation keeps the ``keep`` newest checkpoints up to the one just written (``keep: 0`` keeps all)
and never deletes that one, nor anything newer, nor folders it did not write (only
``checkpoint-<number>`` folders count).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NAME = re.compile(r"checkpoint-(\d+)")
SHARDED = "deepspeed"  # the folder of a sharded (DeepSpeed) optimizer state, in place of optimizer.pt


def checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(epoch, folder) of every complete ``checkpoint-<epoch>`` in ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = NAME.fullmatch(folder.name)
        if match and folder.is_dir() and complete(folder):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def complete(folder: Path) -> bool:
    return (all((folder / f).is_file() for f in ("state.json", "trainable.safetensors"))
            and ((folder / "optimizer.pt").is_file() or (folder / SHARDED).is_dir()))


def refuse_nonfinite(params: dict[str, torch.Tensor], epoch: int, root: str | Path) -> None:
    """A NaN model must never replace a good checkpoint."""
    bad = [k for k, v in params.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"refusing to checkpoint epoch {epoch}: {len(bad)} tensor(s) hold NaN/inf "
                                 f"(first: {bad[0]}); the last good checkpoint in {root} is kept")


def save(root: str | Path, epoch: int, params: dict[str, torch.Tensor], optimizer, state: dict, keep: int = 2,
         scaler=None, sharded: Path | None = None) -> Path:
    """``sharded``: a folder already holding the optimizer state (DeepSpeed's shards), moved in instead of
    saving ``optimizer``'s."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    refuse_nonfinite(tensors, epoch, root)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=root))
    save_file(tensors, tmp / "trainable.safetensors")
    if sharded is not None:
        os.rename(sharded, tmp / SHARDED)
    else:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch}))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    final = root / f"checkpoint-{epoch}"
    if final.exists():  # the same epoch again (e.g. after resuming): move it aside, drop it once replaced
        stale = Path(tempfile.mkdtemp(prefix=".old-checkpoint-", dir=root))
        os.rename(final, stale / final.name)
    os.rename(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for leftover in root.glob(".old-checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep > 0:
        older = [folder for e, folder in checkpoints(root) if e < epoch]
        for folder in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(folder)
    return final


def latest(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names; if that one is missing or incomplete, the newest complete one."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.exists():
        folder = root / pointer.read_text().strip()
        if complete(folder):
            return folder
    found = checkpoints(root)
    if found and pointer.exists():
        print(f"checkpoint {root / pointer.read_text().strip()} named by {pointer} is missing or incomplete; "
              f"using the newest complete one, {found[-1][1].name}")
    return found[-1][1] if found else None


def fingerprint(cfg) -> dict:
    """What a checkpoint's weights belong to (from the run's config); resuming under another answer is refused."""
    lora = cfg.lora
    return {"model.path": str(cfg.model.path), "objective.name": cfg.objective.name, "lora.enabled": lora.enabled,
            "lora.rank": lora.rank if lora.enabled else None, "lora.alpha": lora.alpha if lora.enabled else None,
            "lora.target_modules": list(lora.target_modules or []) if lora.enabled else None,
            "train.ema_decay": bool(cfg.train.ema_decay)}


def check_resumable(folder: Path, state: dict, params: dict[str, torch.Tensor], now: dict,
                    trainable: dict[str, torch.Tensor]) -> None:
    """Refuse to load ``folder`` into a run whose fingerprint or trainable tensors differ, naming what changed."""
    saved = state.get("trained", {})
    changed = [f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in now if k in saved and saved[k] != now[k]]
    mine = {n: tuple(p.shape) for n, p in trainable.items()}
    theirs = {n: tuple(p.shape) for n, p in params.items() if "/" not in n}  # not ema/..., objective/...
    if not changed and mine != theirs:
        changed = [f"trainable weights: {len(theirs)} tensors in the checkpoint, {len(mine)} now"
                   + next((f" (first difference: {n})" for n in sorted(set(mine) ^ set(theirs))), "")]
    if changed:
        raise ValueError(f"cannot resume from {folder}: {'; '.join(changed)}. Resume with the settings the run "
                         "started with, or train into a new output_dir")


def load(folder: str | Path, optimizer=None, scaler=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and state; the optimizer (and grad scaler) state too, unless left for ``load_optimizer``."""
    folder = Path(folder)
    params = load_file(folder / "trainable.safetensors")
    if optimizer is not None:
        load_optimizer(folder, optimizer, scaler)
    return params, json.loads((folder / "state.json").read_text())


def load_optimizer(folder: str | Path, optimizer, scaler=None) -> None:
    folder = Path(folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
