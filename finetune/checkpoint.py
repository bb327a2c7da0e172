"""Atomic checkpoints: a crash while writing never damages the last good checkpoint.

A checkpoint is a folder ``checkpoint-<epoch>`` holding the trainable weights (safetensors), the
optimizer state, and ``state.json`` (epoch, advantage tracker, history). It is written under a
temporary name and renamed into place, then ``latest`` is replaced atomically to point at it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save(root: str | Path, epoch: int, params: dict[str, torch.Tensor], optimizer, state: dict, keep: int = 2) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=root))
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch}))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    final = root / f"checkpoint-{epoch}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)
    return final


def latest(root: str | Path) -> Path | None:
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    folder = Path(root) / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


def load(folder: str | Path, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    params = load_file(folder / "trainable.safetensors")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return params, json.loads((folder / "state.json").read_text())
