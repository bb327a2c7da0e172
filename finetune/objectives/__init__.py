"""Objectives by config name. Each declares what its rollouts must record and which families it serves."""

from __future__ import annotations

import importlib

OBJECTIVES = {
    "ddpo": "finetune.objectives.ddpo:DDPO",
    "flow_grpo": "finetune.objectives.ddpo:FlowGRPO",
    "nft": "finetune.objectives.nft:DiffusionNFT",
    "awm": "finetune.objectives.awm:AWM",
    "loop": "finetune.objectives.loop:LOOP",
    "g2rpo": "finetune.objectives.g2rpo:G2RPO",
    "sft": "finetune.objectives.sft:SFT",
    "dro": "finetune.objectives.dro:DRO",
    "find": "finetune.objectives.find:FIND",
    "ctrl": "finetune.objectives.ctrl:CTRL",
}


def objective_class(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r} (config field `objective.name`); "
                         f"available: {', '.join(OBJECTIVES)}")
    module, attr = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_objective(name: str, family: str | None, **kwargs):
    """``family`` None: check the options only (before the model is loaded)."""
    from finetune.config import check_options

    cls = objective_class(name)
    check_options("objective", name, cls, kwargs)
    if family is not None and family not in cls.families:
        raise ValueError(f"objective {name!r} needs a {' or '.join(cls.families)} model, but `model.path` is a "
                         f"{family} model; pick a matching model or objective "
                         f"(e.g. ddpo or loop for shapes-sd, flow_grpo, g2rpo, nft or awm for shapes-flow)")
    return cls(**kwargs)
